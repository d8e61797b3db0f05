"""`pip install .` (the README's demo command) installs every package: a folder with an
__init__.py that pyproject.toml does not list would be missing from the wheel, and
emotrain would fail on import."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_in_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("emotrain", "optim")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set(), f"add to pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"
