"""The house rules, read from the source: the floors (no import runs up a floor, no
import circles), SDXL reached only through its package surface, the configuration layer
free of torch, a short top of ``emotrain/``, short files."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 420  # "no file over ~400 lines"


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ``known`` that ``name`` imports, at any depth of its code."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            if node.module:  # `from .x import name`: x; `from . import x`: x alone, not the package
                found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def _graph(package: str) -> dict[str, set[str]]:
    modules = _modules(package)
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "active"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "active":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


# The house, ground floor first. A room is a package under emotrain/ or a module at its
# top; a room may import only from itself and from the floors below it.
FLOORS = (
    ("emotrain", "emotrain.errors", "emotrain.precision", "emotrain.quiet", "emotrain.samplers"),  # words
    ("emotrain.sources", "emotrain.optimizers"),  # what names a model or an optimizer
    ("emotrain.options", "emotrain.disk"),  # every option, declared once; what a run keeps on disk
    ("emotrain.sdxl",),  # the model family
    ("emotrain.dataset", "emotrain.lora", "emotrain.loss"),  # data, adapters and files, the objective
    ("emotrain.vram", "emotrain.watch"),  # the memory plan; what a run shows
    ("emotrain.config",),  # a run's settings, checked
    ("emotrain.run",),  # one training run
    ("emotrain.commands",),  # one module per command
    ("emotrain.cli", "emotrain.__main__"),  # the command line
)
MAX_TOP_MODULES = 14


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _floor(room: str) -> int:
    found = [i for i, rooms in enumerate(FLOORS) if room in rooms]
    assert found, f"{room} stands on no floor: add it to FLOORS"
    return found[0]


def test_every_room_stands_on_a_floor_and_no_import_runs_up():
    graph = _graph("emotrain")
    up = sorted(f"{name} -> {target}" for name, targets in graph.items() for target in targets
                if _floor(_room(target)) > _floor(_room(name)))
    assert not up, f"imports that run up a floor: {up}"


def test_the_floor_check_sees_an_import_up():
    assert _floor(_room("emotrain.lora.live")) > _floor(_room("emotrain.disk.atomic"))
    assert _floor(_room("emotrain.options")) < _floor(_room("emotrain.watch.prompts"))


def test_the_top_of_emotrain_stays_short():
    top = sorted(p.name for p in (ROOT / "emotrain").glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, f"{len(top)} modules at the top of emotrain/: {top}"


def test_only_the_lora_package_knows_peft_tensor_names():
    knows = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "emotrain").rglob("*.py")
                   if "lora_A" in p.read_text() or "lora_B" in p.read_text())
    assert knows and all(k.startswith("emotrain/lora/") for k in knows), knows


def test_the_loss_is_computed_in_one_place():
    """Training, validation and vram --measure share emotrain/loss.py: nothing else
    computes an error against a target or a min-SNR weight."""
    computes = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "emotrain").rglob("*.py")
                      if any(word in p.read_text() for word in ("mse_loss", "get_velocity", "compute_snr")))
    assert computes == ["emotrain/loss.py"], computes


def test_no_import_circles():
    assert _cycles(_graph("emotrain")) == []
    assert _cycles(_graph("optim")) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_sdxl_is_reached_through_its_package_surface():
    graph = _graph("emotrain")
    for name, targets in graph.items():
        if name.startswith("emotrain.sdxl"):
            continue
        inner = sorted(t for t in targets if t.startswith("emotrain.sdxl."))
        assert not inner, f"{name} imports {inner}: use the names emotrain.sdxl exports"


@pytest.mark.parametrize("module", ["emotrain.cli", "emotrain.options", "emotrain.config", "emotrain.samplers",
                                    "emotrain.commands", "emotrain.commands.train", "emotrain.commands.vram",
                                    "emotrain.commands.lora", "emotrain.commands.report", "emotrain.commands.sweep",
                                    "emotrain.disk", "emotrain.disk.checkpoint", "emotrain.disk.layout",
                                    "emotrain.disk.atomic", "emotrain.disk.outputs", "emotrain.disk.lock",
                                    "emotrain.disk.tidy", "emotrain.disk.verify", "emotrain.disk.cache",
                                    "emotrain.optimizers", "emotrain.precision", "emotrain.sources", "emotrain.run",
                                    "emotrain.run.processes", "emotrain.quiet", "emotrain.lora", "emotrain.lora.formats",
                                    "emotrain.watch", "emotrain.watch.prompts", "emotrain.watch.checks"])
def test_the_command_line_layer_imports_no_torch_at_load(module):
    path = _modules("emotrain")[module]
    top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
    heavy = {n for n in names if n.split(".")[0] in ("torch", "diffusers", "transformers", "peft", "accelerate",
                                                      "numpy", "safetensors", "bitsandbytes")}
    assert not heavy, f"{module} imports {heavy} at load time"


def test_files_stay_short():
    long = {}
    for folder in ("emotrain", "optim", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            n = len(path.read_text().splitlines())
            if n > MAX_LINES:
                long[str(path.relative_to(ROOT))] = n
    assert not long, f"files over {MAX_LINES} lines: {long}"
