"""EMA of the LoRA (--ema-decay): the saved files equal an EMA computed by hand from the
weights after every step, the EMA survives checkpoints, evaluating with it never changes
the training, and the VRAM plan counts its fp32 copy."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from emotrain import vram
from emotrain.config import TrainConfig, resolve_config
from emotrain.disk import checkpoint
from emotrain.errors import UserError
from emotrain.lora.formats import load_lora_file
from emotrain.lora.start import setup_lora
from emotrain.precision import weight_dtype
from emotrain.run.ema import LoraEma
from emotrain.sdxl import load_sdxl, resolve_model
from helpers import run_cli, run_json, train

DECAY = 0.99


def test_ema_update_and_swap_are_exact():
    torch.manual_seed(0)
    params = {"a": torch.nn.Parameter(torch.randn(3, 4)), "b": torch.nn.Parameter(torch.randn(5))}
    ema = LoraEma(params, 0.9)
    start = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    ema.update()
    for k, t in ema.state_dict().items():  # 0.9 x start + 0.1 x (start + 1)
        torch.testing.assert_close(t, start[k] + 0.1, rtol=0, atol=1e-6)
    kept = {k: p.detach().clone() for k, p in params.items()}
    with ema.swapped_in():
        for k, p in params.items():
            assert torch.equal(p, ema.state_dict()[k])
        with torch.no_grad():
            params["a"].mul_(3)  # whatever happens inside, the training weights come back
    assert all(torch.equal(params[k], kept[k]) for k in params)


def start_weights(cfg) -> dict:
    """The LoRA a run starts from, built as a run builds it (seeded init, tiny model)."""
    sdxl = load_sdxl(resolve_model(cfg.model), weight_dtype(cfg.mixed_precision))
    torch.manual_seed(cfg.seed)
    return {k: p.detach().clone() for k, p in setup_lora(sdxl, cfg).items()}


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema") / "run"
    # every step's weights kept: a checkpoint after each of the 3 steps
    train(out, "--steps", "3", "--ema-decay", str(DECAY), "--save-every", "1", "--keep-checkpoints", "10")
    return out


def test_ema_files_equal_an_ema_computed_by_hand(ema_run):
    cfg = resolve_config(None, {"model": "tiny", "rank": 4, "seed": 0}, needs_data=False)
    weights = [start_weights(cfg)] + [load_file(ema_run / "checkpoints" / f"step-{s:06d}" / "trainable.safetensors")
                                      for s in (1, 2, 3)]
    expected = {k: v.double() for k, v in weights[0].items()}
    for step in weights[1:]:  # the plain definition: ema = decay * ema + (1 - decay) * weights, every step
        assert step.keys() == expected.keys()
        expected = {k: DECAY * expected[k] + (1 - DECAY) * step[k].double() for k in expected}
    final = weights[-1]
    in_checkpoint = load_file(ema_run / "checkpoints" / "step-000003" / "ema.safetensors")
    diffusers_twin = load_file(ema_run / "pytorch_lora_weights-ema.safetensors")
    moved = 0
    for name, want in expected.items():
        torch.testing.assert_close(in_checkpoint[name].double(), want, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(diffusers_twin[name.replace(".default", "")].double(), want, rtol=1e-6, atol=1e-9)
        moved += not torch.equal(in_checkpoint[name], final[name])
    assert moved > len(expected) / 2  # the EMA is not simply the last weights
    kohya = load_lora_file(ema_run / "lora-ema.safetensors")
    diffusers = load_lora_file(ema_run / "pytorch_lora_weights-ema.safetensors")
    assert set(kohya.modules) == set(diffusers.modules)
    for name, m in kohya.modules.items():
        assert torch.equal(m.down, diffusers.modules[name].down) and torch.equal(m.up, diffusers.modules[name].up)
    with safe_open(ema_run / "lora-ema.safetensors", "pt") as fh:
        header = fh.metadata()
    assert header["emotrain_weights"] == "ema" and header["emotrain_ema_decay"] == str(DECAY)
    info = run_json(ema_run)
    assert info["files"]["kohya-ema"] == "lora-ema.safetensors"
    assert info["files"]["diffusers-ema"] == "pytorch_lora_weights-ema.safetensors"
    assert info["ema"]["bytes"] == 4 * info["lora_params"]


def test_a_checkpoint_without_ema_is_not_resumed_with_one(tmp_path):
    out = tmp_path / "plain"
    train(out, "--steps", "1")
    result = run_cli("sdxl-lora", "--resume", out, "--steps", "2", "--ema-decay", "0.9", expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--ema-decay" in lines[0] and "resumed run keeps its config" in lines[0], result.output
    # and the loader itself refuses an EMA run's resume from a checkpoint that holds none
    params = {k: torch.nn.Parameter(v) for k, v in load_file(out / "checkpoints/step-000001/trainable.safetensors").items()}
    with pytest.raises(UserError, match="holds no EMA"):
        checkpoint.restore_checkpoint(out / "checkpoints/step-000001", named_params=params, optimizer=None,
                                      lr_scheduler=None, scaler=None, noise_generator=None, ema=LoraEma(params, 0.9))


def _sample_pixels(out):
    return [torch.from_numpy(np.array(Image.open(p))) for p in sorted((out / "samples").glob("*.png"))]


def test_ema_for_eval_changes_samples_not_training(tmp_path):
    common = ["--steps", "2", "--lr", "1e-2", "--ema-decay", "0.5", "--val-split", "0.2", "--val-timesteps", "1",
              "--sample-prompt", "a red circle --w 64 --h 64 --s 2 --d 4", "--sample-every", "0",
              "--val-every", "0"]
    train(tmp_path / "raw", *common)
    train(tmp_path / "eval", *common, "--ema-for-eval")
    for name in ("lora.safetensors", "lora-ema.safetensors"):  # training went on bit for bit
        a, b = load_file(tmp_path / "raw" / name), load_file(tmp_path / "eval" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    metrics = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("raw", "eval")]
    for key in ("train/loss", "val/loss", "val/loss_ema"):
        assert [r.get(key) for r in metrics[0]] == [r.get(key) for r in metrics[1]], key
    final = [r for r in metrics[0] if "val/loss_ema" in r][-1]
    assert final["step"] == 2 and final["val/loss_ema"] != final["val/loss"]  # two weights, two losses
    raw, ema = _sample_pixels(tmp_path / "raw"), _sample_pixels(tmp_path / "eval")
    assert len(raw) == len(ema) == 2
    assert torch.equal(raw[0], ema[0])  # step 0: the EMA is the starting weights
    assert not torch.equal(raw[1], ema[1])  # the end: drawn with the EMA
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "dashed: their EMA" in html and f"(EMA {final['val/loss_ema']:.5g})" in html  # figure and summary


def test_vram_plan_counts_the_ema(tmp_path):
    cfg = TrainConfig(model="tiny", rank=8, optim="emoairy")
    plain = vram.plan(cfg, activations=False)
    on_gpu = vram.plan(cfg.replace(ema_decay=DECAY), activations=False)
    on_cpu = vram.plan(cfg.replace(ema_decay=DECAY, ema_on_cpu=True), activations=False)
    from diffusers import UNet2DConditionModel
    from emotrain.lora.inject import add_lora, unet_lora_config
    from emotrain.sdxl.tiny import TINY_UNET
    counted = sum(p.numel() for p in add_lora(UNet2DConditionModel.from_config(TINY_UNET), unet_lora_config(8, 8)))
    assert on_gpu["ema"]["bytes"] == on_cpu["ema"]["bytes"] == 4 * counted and plain["ema"] is None
    row, gpu_row, cpu_row = (p["optimizers"]["emoairy"] for p in (plain, on_gpu, on_cpu))
    assert gpu_row["ema_bytes"] == 4 * counted and cpu_row["ema_bytes"] == 0
    assert gpu_row["training_step_bytes"] - row["training_step_bytes"] == 4 * counted
    assert cpu_row["training_step_bytes"] == row["training_step_bytes"]
    table = run_cli("vram", "--model", "tiny", "--resolution", "64", "--rank", "8", "--optim", "emoairy",
                    "--ema-decay", str(DECAY)).output
    assert f"EMA (--ema-decay {DECAY:g}): one fp32 copy of the LoRA, {4 * counted / 1e6:,.1f} MB, on the GPU" in table
    measured = vram.measure(cfg.replace(ema_decay=DECAY, resolution=32, seed=0), "emoairy", steps=1)  # EMA updated
    assert measured["planned_train_step_bytes"]["emoairy"] == gpu_row["training_step_bytes"]


def test_a_checkpoints_ema_file_is_checked_like_the_others(ema_run, tmp_path):
    import shutil

    from emotrain.disk.verify import problem

    good = ema_run / "checkpoints" / "step-000003"
    assert problem(good) is None
    missing, damaged = tmp_path / "step-000003", tmp_path / "damaged" / "step-000003"
    shutil.copytree(good, missing)
    shutil.copytree(good, damaged)
    (missing / "ema.safetensors").unlink()
    assert problem(missing) == "ema.safetensors is missing"
    data = bytearray((damaged / "ema.safetensors").read_bytes())
    data[-1] ^= 1
    (damaged / "ema.safetensors").write_bytes(bytes(data))
    assert "ema.safetensors does not match the sha256" in problem(damaged)


def test_the_swap_gives_back_every_bit_negative_zeros_included():
    p = torch.nn.Parameter(torch.tensor([-0.0, 0.0, 1.5, -2.0]))
    ema = LoraEma({"w": p}, 0.9)
    with torch.no_grad():
        ema.tensors[0].fill_(7.0)
    with ema.swapped_in():
        assert torch.equal(p.detach(), torch.full((4,), 7.0))
    assert p.detach().view(torch.int32).tolist() == torch.tensor([-0.0, 0.0, 1.5, -2.0]).view(torch.int32).tolist()
