"""Prodigy and schedule-free AdamW through the real CLI: kill -9 and --resume are bit-exact
with their internal state; Prodigy gets the settings LoRA users run it with and logs
d x lr; schedule-free saves and validates the weights it evaluates, not its training
iterate; the memory plan is what they allocate; a Prodigy lr meant for AdamW warns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from emotrain import vram
from emotrain.config import TrainConfig
from emotrain.disk.verify import choose_checkpoint
from emotrain.lora.inject import meta_sdxl
from emotrain.optimizers import build_optimizer
from helpers import run_cli, run_json

OPTIMS = ["prodigy", "adamw-schedulefree"]
# No --lr: Prodigy takes its own default (1.0); d_coef 10 (an override) makes its d leave
# d0 within these few steps (at d_coef 1 it takes dozens). Schedule-free's lr is raised
# so that its evaluation point and training iterate differ by more than rounding.
LR = {"prodigy": ["--optim-args", "d_coef=10"], "adamw-schedulefree": ["--lr", "1e-2", "--warmup-steps", "3"]}
STEPS = 8


def _args(optim, *extra):
    return ["--model", "tiny", "--data", "demo", "--resolution", "64", "--batch-size", "2", "--rank", "4",
            "--seed", "0", "--log-with", "none", "--optim", optim, *LR[optim], "--steps", str(STEPS),
            "--val-split", "0.125", "--val-every", "4", *map(str, extra)]


def _state(folder):
    ckpt = choose_checkpoint(folder)[0]
    return ckpt, torch.load(ckpt / "training_state.pt", weights_only=True)["optimizer"]


def _metrics(folder):
    return {r["step"]: r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module", params=OPTIMS)
def runs(request, tmp_path_factory):
    """One run straight through, and one killed with SIGKILL after a checkpoint and
    resumed: the same flags, checkpoints only in the killed one."""
    optim, root = request.param, tmp_path_factory.mktemp(request.param)
    straight, killed = root / "straight", root / "killed"
    run_cli("sdxl-lora", *_args(optim, "--output", straight))
    cli = [sys.executable, "-m", "emotrain", "sdxl-lora", *_args(optim, "--save-every", "2", "--output", killed)]
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000002").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be stopped"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (killed / "pytorch_lora_weights.safetensors").exists(), "killed too late: the run had finished"
    run_cli("sdxl-lora", "--resume", killed)
    return optim, straight, killed


def test_kill_and_resume_is_bit_exact_with_the_optimizer_state(runs):
    optim, straight, killed = runs
    assert run_json(killed)["resumed_from"] is not None
    a, b = (load_file(f / "pytorch_lora_weights.safetensors") for f in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (_, sa), (_, sb) = _state(straight), _state(killed)
    groups = [{k: v for k, v in s["param_groups"][0].items() if k != "params"} for s in (sa, sb)]
    assert groups[0] == groups[1]  # Prodigy's d, d_max, d_numerator, k; schedule-free's k, weight_sum, lr_max
    assert sa["state"].keys() == sb["state"].keys()
    for index, state in sa["state"].items():
        assert state.keys() == sb["state"][index].keys()
        for key, value in state.items():  # Prodigy's s, p0, moments; schedule-free's z, moment, training iterate
            assert torch.equal(value, sb["state"][index][key]) if torch.is_tensor(value) else value == \
                sb["state"][index][key], (index, key)
    expected = {"prodigy": {"s", "p0", "exp_avg", "exp_avg_sq"},
                "adamw-schedulefree": {"z", "exp_avg_sq", "emotrain_train_point"}}[optim]
    assert expected <= set(sa["state"][0])
    metrics = [_metrics(f) for f in (straight, killed)]
    assert [m[s]["train/loss"] for m in metrics for s in range(1, STEPS + 1)] == \
        [metrics[0][s]["train/loss"] for s in range(1, STEPS + 1)] * 2


def test_prodigy_logs_d_times_lr_from_its_state(runs):
    optim, straight, killed = runs
    if optim != "prodigy":
        pytest.skip("Prodigy only")
    group = _state(straight)[1]["param_groups"][0]
    assert (group["lr"], group["d_coef"]) == (1.0, 10)  # its default lr; the override
    ds = []
    for ckpt in sorted((killed / "checkpoints").iterdir()):  # steps 4, 6, 8 of the resumed run
        d = torch.load(ckpt / "training_state.pt", weights_only=True)["optimizer"]["param_groups"][0]["d"]
        step = int(ckpt.name.split("-")[1])
        assert _metrics(killed)[step]["optim/effective_lr"] == d * 1.0 and _metrics(killed)[step]["optim/d"] == d
        ds.append(d)
    assert len(ds) == 3 and ds[-1] > ds[0] > group["d0"]  # d moves: the check above is about a moving value
    assert "d x lr for Prodigy" in (straight / "report.html").read_text()


def test_schedule_free_saves_and_validates_its_evaluation_weights(runs, tmp_path):
    optim, straight, _ = runs
    if optim != "adamw-schedulefree":
        pytest.skip("schedule-free only")
    ckpt, state = _state(straight)
    group = state["param_groups"][0]
    beta1 = group["betas"][0]
    trainable = load_file(ckpt / "trainable.safetensors")
    lora = load_file(straight / "pytorch_lora_weights.safetensors")
    unet = meta_sdxl(TrainConfig(model="tiny", rank=4))["unet"]  # the run's parameter order, without weights
    names = [f"unet.{n}" for n, p in unet.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable)
    assert group["k"] == STEPS and not group["train_mode"]  # written in eval mode
    furthest = 0.0
    for index, name in enumerate(names):
        y, z = state["state"][index]["emotrain_train_point"], state["state"][index]["z"]
        x = (y - (1 - beta1) * z) / beta1  # the schedule-free average, from y = (1 - beta1) z + beta1 x
        saved = lora[name.replace(".default.weight", ".weight")]
        assert torch.equal(saved, trainable[name])
        assert torch.allclose(saved, x, rtol=0, atol=1e-6), name
        furthest = max(furthest, float((saved - y).abs().max()))
    assert furthest > 1e-4  # the saved LoRA is not the training iterate
    # Validation scored the same weights: a run that starts from the saved file scores the
    # same loss before its first step (same validation images, noise and timesteps).
    final = _metrics(straight)[STEPS]["val/loss"]
    run_cli("sdxl-lora", "--model", "tiny", "--data", "demo", "--resolution", "64", "--batch-size", "2", "--seed", "0",
            "--log-with", "none", "--val-split", "0.125", "--steps", "1", "--optim", "adamw",
            "--network-weights", straight / "lora.safetensors", "--output", tmp_path / "from-file")
    assert _metrics(tmp_path / "from-file")[0]["val/loss"] == pytest.approx(final, rel=1e-6, abs=0)
    assert _metrics(straight)[STEPS - 1].get("val/loss") is None
    effective = [_metrics(straight)[s]["optim/effective_lr"] for s in (1, 2, 3, 4)]
    assert effective == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2])  # its own warm-up of 3 steps


def test_prodigy_lr_meant_for_adamw_warns_and_trains_with_the_lora_settings(tmp_path):
    result = run_cli("sdxl-lora", "--model", "tiny", "--data", "demo", "--resolution", "64", "--rank", "4",
                     "--steps", "1", "--log-with", "none", "--optim", "prodigy", "--lr", "3e-4",
                     "--output", tmp_path / "run")
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--lr 0.0003 with prodigy" in warnings[0] and "1.0 is usual" in warnings[0]
    assert run_json(tmp_path / "run")["status"] == "finished"
    group = _state(tmp_path / "run")[1]["param_groups"][0]  # what the optimizer was built with
    settings = {k: group[k] for k in ("lr", "decouple", "use_bias_correction", "safeguard_warmup", "betas",
                                      "weight_decay", "d_coef")}
    assert settings == {"lr": 3e-4, "decouple": True, "use_bias_correction": True, "safeguard_warmup": True,
                        "betas": (0.9, 0.99), "weight_decay": 0.01, "d_coef": 1.0}


def test_prodigy_settings_are_overridable_and_groups_need_one_lr():
    param = torch.nn.Parameter(torch.zeros(4, 4))
    group = build_optimizer("prodigy", [param], 1.0, args={"d_coef": 2.0, "betas": (0.9, 0.999)}).param_groups[0]
    assert (group["d_coef"], group["betas"], group["weight_decay"], group["safeguard_warmup"]) == \
        (2.0, (0.9, 0.999), 0.01, True)
    other = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(Exception, match="takes one lr"):
        build_optimizer("prodigy", [{"params": [param], "lr": 1.0}, {"params": [other], "lr": 0.5}], 1.0)


def test_vram_plans_what_they_allocate():
    m = vram.measure(TrainConfig(model="tiny", rank=4, resolution=32, seed=0), ",".join(OPTIMS), "off", steps=3)
    for name in OPTIMS:
        row = m["optimizers"][name]
        assert row["match"], row
    lora = m["lora_params"] * 4
    # Prodigy: s, p0, exp_avg and exp_avg_sq (p0 is 0-dim for the up weights, which start at
    # zero); schedule-free: z and exp_avg_sq.
    assert m["optimizers"]["adamw-schedulefree"]["planned_state_bytes"] == 2 * lora
    assert 3 * lora < m["optimizers"]["prodigy"]["planned_state_bytes"] < 4 * lora


def test_schedule_free_evaluation_leaves_the_training_exact():
    """Without a model: evaluating (validation, samples) and a checkpoint written and read
    back through torch.load(weights_only=True) never change where training goes."""
    import io

    from emotrain.optimizers import evaluation_point, restore_train_point

    def make():
        torch.manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
        return params, build_optimizer("adamw-schedulefree", params, 1e-2, warmup_steps=2)

    def step(params, opt, k):
        g = torch.Generator().manual_seed(k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad()

    (a, opt_a), (b, opt_b), (c, opt_c) = make(), make(), make()
    for k in range(6):
        step(a, opt_a, k), step(b, opt_b, k)
    y = [p.detach().clone() for p in a]
    with evaluation_point(opt_a):
        beta1 = opt_a.param_groups[0]["betas"][0]
        for p, y_, z in zip(a, y, (opt_a.state[p]["z"] for p in a)):
            assert torch.allclose(p, (y_ - (1 - beta1) * z) / beta1, rtol=0, atol=1e-6)  # the average x
            assert not torch.allclose(p, y_, rtol=0, atol=1e-4)
    assert all(torch.equal(p, y_) for p, y_ in zip(a, y))
    with evaluation_point(opt_b, keep_train_point=True):
        buffer = io.BytesIO()
        torch.save({"optimizer": opt_b.state_dict(), "weights": [p.detach().clone() for p in b]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    with torch.no_grad():
        for p, w in zip(c, saved["weights"]):
            p.copy_(w)
    opt_c.load_state_dict(saved["optimizer"])
    restore_train_point(opt_c)
    for k in range(6, 10):
        step(a, opt_a, k), step(c, opt_c, k)
    assert all(torch.equal(p, q) for p, q in zip(a, c))
    assert all(torch.equal(opt_a.state[p]["z"], opt_c.state[q]["z"]) for p, q in zip(a, c))
