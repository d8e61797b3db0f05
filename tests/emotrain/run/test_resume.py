"""Exact resume: N steps, a stop (end of run, kill -9 or Ctrl-C), N more == 2N straight."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from emotrain.disk.verify import choose_checkpoint
from helpers import run_cli, train


def lora_tensors(output):
    return load_file(output / "pytorch_lora_weights.safetensors")


def assert_identical(a, b):
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs after resume"


# Each Emo optimizer once, the shadow on and off both (each optimizer's own state_dict
# resume, shadow on, is bit-exact in tests/optim/test_optim_state.py; the hard stops below
# run EmoAiry with the shadow).
COMBOS = [("emosens", True), ("emoairy", False), ("emocats", True)]


@pytest.mark.parametrize("optim,shadow", COMBOS)
def test_resume_is_bit_identical(tmp_path, optim, shadow):
    # 3 steps x 2 micro-batches x batch 2 = 12 of 16 demo images: the stop falls mid-epoch.
    common = ["--optim", optim, "--shadow" if shadow else "--no-shadow", "--grad-accum", "2",
              "--optim-args", "weight_decay=0.05"]
    train(tmp_path / "straight", *common, "--steps", "6")
    train(tmp_path / "split", *common, "--steps", "3")
    run_cli("sdxl-lora", "--resume", tmp_path / "split", "--steps", "6")
    assert_identical(tmp_path / "straight", tmp_path / "split")


def _cli(*args):
    return [sys.executable, "-m", "emotrain", "sdxl-lora", "--model", "tiny", "--data", "demo", "--resolution", "64",
            "--batch-size", "2", "--rank", "4", "--lr", "1e-3", "--seed", "0", *map(str, args)]


# 16 steps: the stop lands after the step-4 checkpoint, a dozen steps before the run could end
HARD_STOP = ["--optim", "emoairy", "--shadow", "--lr-scheduler", "cosine", "--warmup-steps", "2", "--steps", "16"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    train(out, *HARD_STOP)
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_resume_after_a_hard_stop(tmp_path, straight_run, sig):
    out = tmp_path / "stopped"
    proc = subprocess.Popen(_cli(*HARD_STOP, "--save-every", "2", "--output", out), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-000004").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be stopped"
        time.sleep(0.05)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    if sig != signal.SIGKILL:  # Ctrl-C and SIGTERM (timeout, docker stop, SLURM) alike: a checkpoint, a message
        assert proc.returncode == 130 and f"({sig.name})" in output and "interrupted at step" in output, output
        assert "--resume" in output and "Traceback" not in output
        assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    latest = choose_checkpoint(out)[0]
    assert latest.name < "step-000016"
    run_cli("sdxl-lora", "--resume", out)
    assert_identical(straight_run, out)


def test_damaged_checkpoint_is_never_latest(tmp_path):
    out = tmp_path / "run"
    train(out, "--steps", "4", "--save-every", "2")
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]
    (ckpts / "step-000004" / "training_state.pt").write_bytes(b"")  # torn write of a file
    (ckpts / "step-000004" / "checkpoint.json").unlink()  # ...and the marker never written
    (ckpts / ".step-000006.1.0123abcd.tmp").mkdir()  # a save killed before its rename
    (ckpts / "step-000008").mkdir()  # an empty folder with a checkpoint's name
    assert choose_checkpoint(out)[0].name == "step-000002"


def test_resume_refuses_a_changed_run(tmp_path):
    out = tmp_path / "run"
    train(out, "--steps", "2", "--optim", "emocats")
    for args, word in [(["--optim", "emosens"], "--optim"), (["--rank", "8"], "--rank"), (["--model", "tiny:1"], "--model")]:
        result = run_cli("sdxl-lora", "--resume", out, *args, expect=2)
        assert word in result.output and "checkpoint" in result.output
    result = run_cli("sdxl-lora", "--resume", tmp_path / "nothing", expect=2)
    assert "does not exist" in result.output


def test_keep_checkpoints(tmp_path):
    out = tmp_path / "run"
    train(out, "--steps", "6", "--save-every", "1", "--keep-checkpoints", "2")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000005", "step-000006"]


def test_checkpoint_state_loads_without_pickle(tmp_path):
    out = tmp_path / "run"
    train(out, "--steps", "2", "--optim", "emosens", "--shadow")
    state = torch.load(choose_checkpoint(out)[0] / "training_state.pt", weights_only=True)
    assert {"optimizer", "lr_scheduler", "noise_generator", "rng"} <= set(state)


def test_resume_is_bit_identical_with_the_loss_and_noise_options(tmp_path):
    """Every new draw (offset strength, pyramid noise, timestep range, input perturbation)
    comes from the run's generator: a stop and --resume replays it."""
    common = ["--loss-type", "huber", "--huber-schedule", "exponential", "--debiased-estimation",
              "--min-timestep", "100", "--max-timestep", "900", "--ip-noise-gamma", "0.1",
              "--multires-noise-iterations", "3", "--noise-offset", "0.05", "--noise-offset-random-strength"]
    train(tmp_path / "straight", *common, "--steps", "4")
    train(tmp_path / "split", *common, "--steps", "2")
    run_cli("sdxl-lora", "--resume", tmp_path / "split", "--steps", "4")
    assert_identical(tmp_path / "straight", tmp_path / "split")
    plain = tmp_path / "plain"
    train(plain, "--steps", "4")
    assert not torch.equal(*(next(iter(lora_tensors(d).values())) for d in (plain, tmp_path / "straight")))


def test_ema_resume_after_kill_9(tmp_path):
    """kill -9 between checkpoints, then --resume: both LoRA files of an EMA run equal an
    uninterrupted run's bit for bit (--ema-for-eval may be added on resume: it changes
    what samples show, not the training)."""
    common = ["--ema-decay", "0.9", "--steps", "8", "--log-with", "none"]
    train(tmp_path / "straight", *common)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*common, "--save-every", "2", "--output", out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-000004").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be stopped"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "lora-ema.safetensors").exists()  # a stopped run writes no LoRA file, EMA or not
    run_cli("sdxl-lora", "--resume", out, "--ema-for-eval")
    for name in ("lora.safetensors", "lora-ema.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after kill -9"
    ema, final = load_file(out / "lora-ema.safetensors"), load_file(out / "lora.safetensors")
    assert any(not torch.equal(ema[k], final[k]) for k in ema if k.endswith("lora_up.weight"))


def test_resume_is_bit_identical_with_dropout_and_max_norm(tmp_path):
    """Dropout masks come from the run's generator and max-norm acts on the saved factors:
    a stop and --resume replays both; the max-norm figures reach metrics.jsonl."""
    common = ["--network-dropout", "0.1", "--rank-dropout", "0.2", "--module-dropout", "0.1",
              "--scale-weight-norms", "0.01", "--grad-accum", "2"]
    train(tmp_path / "straight", *common, "--steps", "4")
    train(tmp_path / "split", *common, "--steps", "2")
    run_cli("sdxl-lora", "--resume", tmp_path / "split", "--steps", "4")
    assert_identical(tmp_path / "straight", tmp_path / "split")
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 0]
    assert len(steps) == 4 and all(r["max_norm/keys_scaled"] > 0 for r in steps)
    assert all(r["max_norm/max_key_norm"] == pytest.approx(0.01, rel=1e-4) for r in steps)
    assert all(r["max_norm/max_key_norm_before"] > 0.01 for r in steps)
    plain = tmp_path / "plain"
    train(plain, "--steps", "4", "--grad-accum", "2", "--scale-weight-norms", "0.01")
    assert not torch.equal(*(next(iter(lora_tensors(d).values())) for d in (plain, tmp_path / "straight")))
