"""The memory check before the model loads, and run.json's memory beside the plan.

On CPU the check runs only with EMOTRAIN_FAKE_FREE_MEMORY_MIB (run/memory.py), which
stands in for ``torch.cuda.mem_get_info``: the CLI tests below go through it."""

import json

import pytest
import torch

import emotrain.run.loop as loop
from emotrain.disk.layout import RunFolder
from emotrain.run.memory import FAKE_FREE
from emotrain.run.record import RunRecord
from helpers import FAST, run_cli, run_json, train


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


def test_too_little_memory_stops_in_one_line_before_anything(tmp_path, monkeypatch):
    # 1 MiB less than the run's plan (emotrain vram, same flags): the first change that
    # fits is named (a budget nothing fits would make the search plan every change)
    vram = json.loads(run_cli("vram", *FAST, "--steps", "2", "--optim", "emoairy", "--no-shadow", "--json").stdout)
    short = vram["optimizers"]["emoairy"]["peak_bytes"] // 2**20 - 1
    monkeypatch.setenv(FAKE_FREE, str(short))
    monkeypatch.setattr(loop, "load_sdxl", _no_model)
    out = tmp_path / "run"
    result = train(out, "--steps", "2", expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "will not fit" in lines[0] and "short by" in lines[0] and "--no-memory-check" in lines[0]
    assert f"{short} MiB free" in lines[0] and "cheapest fix: --" in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()  # no lock, no folder, no run.json


@pytest.fixture(scope="module")
def planned_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAKE_FREE, "100000")
        out = tmp_path_factory.mktemp("fits") / "run"
        result = train(out, "--steps", "2")
    return out, result


def test_enough_memory_runs_and_records_the_plan_vram_makes(planned_run):
    out, result = planned_run
    assert "memory: planned peak" in result.output and "fits with" in result.output
    memory = run_json(out)["memory"]
    # the same flags through `emotrain vram`: the plan of the run's own optimizer row
    vram = json.loads(run_cli("vram", *FAST, "--steps", "2", "--optim", "emoairy", "--no-shadow", "--json").stdout)
    row = vram["optimizers"]["emoairy"]
    assert memory["planned_peak_bytes"] == row["peak_bytes"] > 0
    assert memory["planned"]["activation_bytes"] == row["activation_bytes"]
    assert memory["measured_peak_bytes"] is None  # CPU: no allocator peak
    assert memory["optimizer_state_bytes"] > 0  # the measured breakdown beside it
    assert memory["free_bytes"] == 100000 * 2**20


def test_no_memory_check_goes_on_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv(FAKE_FREE, "1")
    out = tmp_path / "run"
    result = train(out, "--steps", "1", "--no-memory-check")
    assert "--no-memory-check" in result.output and "not compared" in result.output
    memory = run_json(out)["memory"]
    assert memory["planned_peak_bytes"] is None and "--no-memory-check" in memory["plan"]


def test_a_step_without_a_trace_is_said_and_the_run_goes_on(tmp_path, monkeypatch):
    from torch._subclasses.fake_tensor import DataDependentOutputException

    import importlib

    plan_module = importlib.import_module("emotrain.vram.plan")  # the module, not vram.plan the function

    def untraceable(*args, **kwargs):
        raise DataDependentOutputException(torch.ops.aten._local_scalar_dense.default)

    monkeypatch.setattr(plan_module, "step_activations", untraceable)
    monkeypatch.setenv(FAKE_FREE, "1")  # would not fit, if it could be planned
    out = tmp_path / "run"
    result = train(out, "--steps", "1", "--adapter", "loha")
    notes = [line for line in result.output.splitlines() if "memory check is skipped" in line]
    assert len(notes) == 1 and "loha" in notes[0], result.output
    assert run_json(out)["memory"]["planned_peak_bytes"] is None


def test_a_stopped_runs_record_holds_the_memory(tmp_path):
    folder = RunFolder(tmp_path)
    planned = {"planned_peak_bytes": 123, "measured_peak_bytes": None}
    with pytest.raises(RuntimeError):
        with RunRecord(folder, {"x": 1}, True, memory=lambda: dict(planned)):
            raise RuntimeError("boom")
    record = json.loads(folder.run_json.read_text())
    assert record["status"] == "error" and record["memory"] == planned
