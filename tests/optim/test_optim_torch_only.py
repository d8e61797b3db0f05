"""optim/ stays a torch-only package: no module in it imports the training tool or the
Hugging Face stack (emotrain, diffusers, peft, transformers, accelerate).

The check reads the source with ast instead of importing it, so an import inside a
function, a try block or an ``importlib.import_module("...")`` call is seen too. The
checker is itself tested on a source that does import those packages, and the package
directory must contain its known modules, so the test cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "optim"
FORBIDDEN = {"emotrain", "diffusers", "peft", "transformers", "accelerate"}
ALLOWED = {"torch", "__future__"} | set(sys.stdlib_module_names)
KNOWN_MODULES = {"__init__", "_adamstyle", "_base", "_emotion", "_native", "emosens", "emoairy",
                 "emocats", "memory"}


def imported_modules(source: str) -> set[str]:
    """Top-level names of every absolute import in ``source``.

    Covers ``import x``, ``from x import y`` (relative imports are the package's own) and
    ``import_module("x")`` / ``__import__("x")`` called with a literal name.
    """
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if (fname in ("import_module", "__import__") and isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str) and not arg.value.startswith(".")):
                names.add(arg.value)
    return {n.split(".")[0] for n in names}


def _package_files() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_checker_sees_every_form_of_import():
    bad = '''
import diffusers
from emotrain.sdxl import tiny
import os, peft.tuners as tuners
from . import _native
from .memory import state_nbytes

def later():
    try:
        import transformers
    except ImportError:
        pass
    import importlib
    return importlib.import_module("accelerate.utils"), __import__("json")
'''
    found = imported_modules(bad)
    assert found == FORBIDDEN | {"os", "importlib", "json"}
    assert not found <= ALLOWED


def test_the_package_directory_holds_its_modules():
    stems = {f.stem for f in _package_files()}
    assert KNOWN_MODULES <= stems, f"{PACKAGE} lacks {KNOWN_MODULES - stems}"


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: p.name)
def test_module_imports_torch_and_stdlib_only(path):
    names = imported_modules(path.read_text())
    assert "torch" in names or path.stem == "__init__"
    assert not names & FORBIDDEN, f"{path.name} imports {sorted(names & FORBIDDEN)}"
    assert names <= ALLOWED, f"{path.name} imports {sorted(names - ALLOWED)}"
