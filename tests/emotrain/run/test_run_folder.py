"""A run folder's work is never replaced or deleted by the next command there: a finished
run whose checkpoints were deleted still holds the folder, a resume keeps the checkpoints
it cannot use, a lock that cannot be cleared (or may not be a run's) is explained in one
line, and the paths a run prints open from where the user is (issue 15: 1, 3, 9, 14, 18)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from emotrain.disk import lock as lock_module
from helpers import FAST, run_cli, run_json, train


def cli(*args, cwd=None):
    """The real command in a fresh process."""
    return subprocess.run([sys.executable, "-m", "emotrain", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def snapshot(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A run of 3 steps with a checkpoint after each (kept), to copy and damage."""
    out = tmp_path_factory.mktemp("three") / "run"
    train(out, "--steps", "3", "--save-every", "1", "--keep-checkpoints", "3")
    return out


def test_a_finished_run_without_checkpoints_still_holds_its_folder(three_steps, tmp_path):
    out = shutil.copytree(three_steps, tmp_path / "run")
    shutil.rmtree(out / "checkpoints")  # to free space
    before = snapshot(out)
    message = one_line(cli("sdxl-lora", *FAST, "--steps", "1", "--output", out))
    assert f"{out} already holds a finished run (lora.safetensors" in message and "pass another --output" in message
    for kept in (["lora.safetensors"], ["run.json"], ["metrics.jsonl", "report.html"]):  # any one of its files
        only = tmp_path / ("only-" + kept[0])
        only.mkdir()
        for name in kept:
            shutil.copy(out / name, only / name)
        assert "already holds" in one_line(cli("sdxl-lora", *FAST, "--steps", "1", "--output", only))
    assert snapshot(out) == before
    sweep = tmp_path / "sweep"  # a sweep's folder is no run's output either
    sweep.mkdir()
    (sweep / "sweep.json").write_text('{"runs": []}')
    assert "holds a sweep (sweep.json)" in one_line(cli("sdxl-lora", *FAST, "--steps", "1", "--output", sweep))


def test_a_run_stopped_before_saving_anything_starts_over_and_paths_open_from_here(tmp_path, monkeypatch):
    out = tmp_path / "rel"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"status": "interrupted", "losses": [1.0]}))
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    monkeypatch.chdir(tmp_path)
    result = run_cli("sdxl-lora", *FAST, "--steps", "1", "--output", "rel")
    assert "held a run that stopped (interrupted) before its first checkpoint: starting over" in result.output
    assert run_json(out)["status"] == "finished"
    # the stopped run's files are kept, renamed aside, and said so
    assert json.loads((out / "run.json.unused").read_text())["status"] == "interrupted"
    assert (out / "metrics.jsonl.unused").read_text() == '{"step": 0}\n'
    assert "kept the stopped run's metrics.jsonl as metrics.jsonl.unused" in result.output
    # item 18: what the run prints opens from the working directory
    assert "report: rel/report.html" in result.output
    assert "saved rel/lora.safetensors and rel/pytorch_lora_weights.safetensors" in result.output
    monkeypatch.chdir(tmp_path / "rel" / "checkpoints")
    report = run_cli("report", "..")
    assert report.output.strip() == f"wrote {out.resolve() / 'report.html'}"  # outside the working directory


def test_resume_keeps_the_checkpoints_it_cannot_use(three_steps, tmp_path):
    out = shutil.copytree(three_steps, tmp_path / "run")
    ckpts = out / "checkpoints"
    (ckpts / "step-000003" / "training_state.pt").unlink()  # removed by the user
    (ckpts / "step-000001" / "checkpoint.json").unlink()  # an older one, incomplete
    kept3 = snapshot(ckpts / "step-000003")
    kept1 = snapshot(ckpts / "step-000001")
    result = cli("sdxl-lora", "--resume", out, "--steps", "3")
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "skipped checkpoint step-000003: training_state.pt is missing" in err
    assert "resumed from" in err and "step-000002 at step 2" in err
    assert "kept step-000003, which this run does not use, as checkpoints/step-000003.unused" in err
    assert "kept checkpoints/step-000001, which cannot be used" in err
    assert "removed what an interrupted earlier attempt left" not in err
    assert snapshot(ckpts / "step-000003.unused") == kept3  # the intact LoRA weights included
    assert snapshot(ckpts / "step-000001") == kept1
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001", "step-000002", "step-000003",
                                                       "step-000003.unused"]
    assert run_json(out)["status"] == "finished" and run_json(out)["steps"] == 3


def test_a_stale_lock_that_cannot_be_removed(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = out / ".emotrain.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}))
    immutable = subprocess.run(["chattr", "+i", str(lock)], capture_output=True).returncode == 0 \
        if shutil.which("chattr") else False
    try:
        if not immutable:  # no chattr here (not root, tmpfs): the same refusal the file system would give
            real_unlink = lock_module.Path.unlink

            def unlink(self, *args, **kwargs):
                if self == lock:
                    raise PermissionError(1, "Operation not permitted")
                return real_unlink(self, *args, **kwargs)
            monkeypatch.setattr(lock_module.Path, "unlink", unlink)
        result = train(out, "--steps", "1", expect=2)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(lock)], check=True)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert f"holds the lock of a run that is gone (pid {dead.pid}), and it cannot be removed" in lines[0]
    assert f"delete {lock} yourself" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == [".emotrain.lock"]


def test_a_lock_naming_an_unrelated_live_process_says_how_to_clear_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".emotrain.lock"
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "started": "2020-01-01 00:00:00"}))
    message = one_line(cli("sdxl-lora", *FAST, "--steps", "1", "--output", out))
    assert "is locked by pid 1" in message and "may not be the run that took the lock" in message
    assert f"if no emotrain run uses {out}, delete {lock}" in message
    # a lock this very process holds (its start time recorded) is a live run: wait for it
    ticks = int(open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19])
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now",
                                "start_ticks": ticks}))
    assert "in use by another emotrain run" in run_cli("sdxl-lora", *FAST, "--output", out, expect=2).output
