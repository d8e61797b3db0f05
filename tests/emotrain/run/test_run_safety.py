"""A run never loses or misplaces work: the output folder's lock, signals, leftovers of
killed attempts, checkpoints verified before use, resumes that write where the run is,
nothing non-finite saved, and run.json's history and status on every way out."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emotrain.disk.verify import choose_checkpoint
from helpers import FAST, run_cli, run_json, train

# Only the plugin folder goes on the path: tests/ itself holds folders named like the packages
# (optim, emotrain), which would shadow the installed ones when the command runs elsewhere.
PLUGINS = str(Path(__file__).resolve().parents[2] / "plugins")


def cli(*args, cwd=None, **kwargs):
    """The real command in a fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), PLUGINS]))}
    return subprocess.run([sys.executable, "-m", "emotrain", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env, **kwargs)


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run of 4 steps with a checkpoint after each (kept), to copy and damage."""
    out = tmp_path_factory.mktemp("four") / "run"
    train(out, "--steps", "4", "--save-every", "1", "--keep-checkpoints", "4")
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# -- the output folder's lock ------------------------------------------------------------

def test_a_live_lock_refuses_a_second_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ticks = int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "earlier", "start_ticks": ticks}  # alive
    (out / ".emotrain.lock").write_text(json.dumps(holder))
    result = cli("sdxl-lora", *FAST, "--output", out, "--steps", "1")
    assert result.returncode == 2
    assert f"in use by another emotrain run (pid {os.getpid()}" in one_line(result)
    assert sorted(p.name for p in out.iterdir()) == [".emotrain.lock"]  # nothing else written


def test_stale_lock_and_leftovers_are_cleared_on_resume(four_steps, tmp_path):
    out = copy_run(four_steps, tmp_path / "run")
    ckpts = out / "checkpoints"
    (out / ".emotrain.lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(),
                                                    "started": "earlier"}))
    tmp_save = ckpts / ".step-000005.999.0123abcd.tmp"  # a save killed before its rename
    tmp_save.mkdir()
    (tmp_save / "trainable.safetensors").write_bytes(b"x" * 1000)
    (ckpts / ".step-000001.999.0123abcd.trash").mkdir()  # a prune killed before its delete
    (ckpts / "step-000001" / "checkpoint.json").unlink()  # half-deleted in place: kept (only temporary names go)
    (out / ".run.json.999.0123abcd.tmp").write_text("{")
    result = cli("sdxl-lora", "--resume", out, "--steps", "5")
    assert result.returncode == 0, result.stderr
    assert "took over the lock of an earlier run that is no longer running" in result.stderr
    assert "removed what an interrupted earlier attempt left" in result.stderr
    assert "kept checkpoints/step-000001, which cannot be used" in result.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001", "step-000002", "step-000003", "step-000004",
                                                       "step-000005"]
    assert not (out / ".emotrain.lock").exists() and not (out / ".run.json.999.0123abcd.tmp").exists()


def test_a_refused_run_leaves_nothing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    result = train(out, "--data", data, expect=2)
    assert "cannot read image" in result.output and "a.png" in result.output
    assert not out.exists()  # the lock took the folder, and gave it back empty-handed


# -- resume writes where the run is ---------------------------------------------------------

def test_a_copied_run_resumes_in_place(four_steps, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in four_steps.rglob("*")}
    copy = copy_run(four_steps, tmp_path / "moved")
    run_cli("sdxl-lora", "--resume", copy, "--steps", "5")
    assert (copy / "checkpoints" / "step-000005").is_dir()
    assert {p: p.stat().st_mtime_ns for p in four_steps.rglob("*")} == before  # the original is untouched
    run = run_json(copy)
    assert run["checkpoint"] == "checkpoints/step-000005" and run["files"]["kohya"] == "lora.safetensors"
    assert run["steps"] == 5 and len(run["losses"]) == 5
    assert run["losses"][:4] == run_json(four_steps)["losses"]  # the history travelled with the checkpoint


def test_a_relative_output_resumes_from_another_directory(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    run_cli("sdxl-lora", *FAST, "--steps", "2", "--output", "rel")
    monkeypatch.chdir(tmp_path / "b")
    run_cli("sdxl-lora", "--resume", "../a/rel", "--steps", "3")
    assert (tmp_path / "a" / "rel" / "checkpoints" / "step-000003").is_dir()
    assert list((tmp_path / "b").iterdir()) == []


# -- checkpoints are verified before use ----------------------------------------------------

def damage(run, step, how):
    ckpt = run / "checkpoints" / f"step-{step:06d}"
    if how == "truncate":
        data = (ckpt / "training_state.pt").read_bytes()
        (ckpt / "training_state.pt").write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data = bytearray((ckpt / "trainable.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (ckpt / "trainable.safetensors").write_bytes(bytes(data))
    elif how == "garbage json":
        (ckpt / "checkpoint.json").write_text("{ not json")
    elif how == "edited rank":
        meta = json.loads((ckpt / "checkpoint.json").read_text())
        meta["config"]["rank"] = 8
        (ckpt / "checkpoint.json").write_text(json.dumps(meta))


def test_damaged_checkpoints_are_skipped_with_the_reason(four_steps, tmp_path):
    out = copy_run(four_steps, tmp_path / "run")
    damage(out, 4, "truncate")
    damage(out, 3, "garbage json")
    damage(out, 2, "edited rank")
    result = cli("sdxl-lora", "--resume", out, "--steps", "4")
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "skipped checkpoint step-000004: training_state.pt is" in err and "truncated" in err
    assert "skipped checkpoint step-000003: its checkpoint.json is unreadable" in err
    assert "skipped checkpoint step-000002: its checkpoint.json was changed after it was written" in err
    assert "resumed from" in err and "step-000001 at step 1" in err
    assert run_json(out)["steps"] == 4 and len(run_json(out)["losses"]) == 4
    assert all((out / "checkpoints" / f"step-00000{n}.unused").is_dir() for n in (2, 3, 4))  # kept, not replaced


@pytest.mark.parametrize("how,reason", [("flip", "does not match the sha256"), ("edited rank", "was changed after"),
                                        ("truncate", "truncated or replaced")])
def test_a_damaged_checkpoint_named_directly_is_refused(four_steps, tmp_path, how, reason):
    out = copy_run(four_steps, tmp_path / "run")
    damage(out, 4, how)
    result = cli("sdxl-lora", "--resume", out / "checkpoints" / "step-000004", "--steps", "5")
    assert result.returncode == 2 and reason in one_line(result)
    assert not (out / "checkpoints" / "step-000005").exists()


def test_resuming_an_older_checkpoint_in_place_is_refused(four_steps, tmp_path):
    out = copy_run(four_steps, tmp_path / "run")
    result = cli("sdxl-lora", "--resume", out / "checkpoints" / "step-000002")
    assert result.returncode == 2 and "would mix two histories" in one_line(result)


# -- nothing non-finite is saved; run.json says how every run ended -------------------------

def test_a_nan_loss_stops_at_the_last_good_state(tmp_path):
    out = tmp_path / "run"
    result = train(out, "--optim", "adamw", "--lr", "10", "--max-grad-norm", "0", "--steps", "8", expect=2)
    assert "loss became nan" in result.output and "checkpoint" in result.output
    run = run_json(out)
    latest = choose_checkpoint(out)[0]
    assert run["status"] == "stopped-nan" and len(run["losses"]) == int(latest.name.split("-")[1])
    assert all(torch.isfinite(v).all() for v in load_file(latest / "trainable.safetensors").values())
    assert not (out / "lora.safetensors").exists()


@pytest.mark.parametrize("what", ["params", "state"])
def test_a_non_finite_state_is_never_saved(tmp_path, what):
    out = tmp_path / "run"
    result = train(out, "--optim", "optimizers_for_tests.PoisonSGD", "--optim-args", f"at=3 what='{what}'",
                   "--steps", "6", "--save-every", "1", expect=2)
    assert "holds nan or inf" in result.output and "not saved" in result.output
    assert "the last good checkpoint is" in result.output and "step-000002" in result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert run_json(out)["status"] == "stopped-nan" and not (out / "pytorch_lora_weights.safetensors").exists()


def test_a_signal_inside_the_optimizer_step_waits_for_the_step_boundary(tmp_path):
    # SIGINT arrives half-way through update 3: the update completes, the loop stops at the
    # next look, and the checkpoint named step 3 holds exactly what 3 full updates give.
    sgd = ["--optim", "optimizers_for_tests.PlainSGD", "--lr", "0.05"]
    train(tmp_path / "straight", *sgd, "--steps", "3")
    out = tmp_path / "run"
    result = train(out, "--optim", "optimizers_for_tests.SignalSGD", "--lr", "0.05", "--optim-args", "at=3",
                   "--steps", "6", expect=130)
    assert "interrupted at step 3 (SIGINT)" in result.output and "--resume" in result.output
    got = load_file(out / "checkpoints" / "step-000003" / "trainable.safetensors")
    want = load_file(tmp_path / "straight" / "checkpoints" / "step-000003" / "trainable.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    run = run_json(out)
    assert run["status"] == "interrupted" and len(run["losses"]) == 3


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = train(out, "--optim", "optimizers_for_tests.SignalSGD", "--optim-args", "at=2 count=2",
                   "--steps", "4", expect=130)
    assert "stopped at once" in result.output and "there is no checkpoint yet" in result.output
    assert run_json(out)["status"] == "interrupted" and not (out / "checkpoints").exists()
    # SIGTERM twice (SLURM signals every process, and the launcher forwards it again) is one request
    out = tmp_path / "term"
    result = train(out, "--optim", "optimizers_for_tests.SignalSGD", "--optim-args", "at=2 count=2 sig='SIGTERM'",
                   "--steps", "4", expect=130)
    assert "interrupted at step 2 (SIGTERM)" in result.output and (out / "checkpoints" / "step-000002").is_dir()


def test_an_unforeseen_error_is_recorded(tmp_path):
    out = tmp_path / "run"
    result = train(out, "--optim", "optimizers_for_tests.FailingSGD", "--steps", "4", expect=None)
    assert result.exit_code not in (0, 2) and isinstance(result.exception, RuntimeError)
    run = run_json(out)
    assert run["status"] == "error" and "the optimizer broke" in run["message"] and len(run["losses"]) == 1
