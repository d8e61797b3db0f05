"""Training with per-draw data: exact resume with shuffling, dropout, flips and random
crops; masked loss; regularization loss weight; what `emotrain vram` keeps loaded."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from data_helpers import write_images
from emotrain.loss import Objective
from emotrain.sdxl import load_config
from helpers import run_cli, run_json, train

TAGS = {f"{i}.png": f"sks, tag{i}, red, round, shiny, small{i}" for i in range(6)}


@pytest.mark.parametrize("flags", [
    ["--shuffle-captions", "--keep-tokens", "1", "--caption-dropout", "0.2", "--tag-dropout", "0.2", "--flip"],
    ["--random-crop", "--flip", "--shuffle-captions"],
], ids=["captions-and-flip", "random-crop"])
def test_resume_is_exact_with_per_draw_data(tmp_path, flags):
    data = write_images(tmp_path / "d", TAGS, size=(80, 64))  # wider than its bucket: room for random crops
    common = ["--data", data, "--grad-accum", "2", "--record-draws", *flags]
    train(tmp_path / "straight", *common, "--steps", "6")
    train(tmp_path / "split", *common, "--steps", "3")
    run_cli("sdxl-lora", "--resume", tmp_path / "split", "--steps", "6")
    a, b = (load_file(tmp_path / r / "pytorch_lora_weights.safetensors") for r in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    draws = (tmp_path / "straight" / "draws.jsonl").read_text()
    assert draws == (tmp_path / "split" / "draws.jsonl").read_text()  # the same images, captions, flips, crops
    records = [json.loads(line) for line in draws.splitlines()]
    assert len(records) == 6 * 2 * 2 and len({r["caption"] for r in records}) > 6 and any(r["flip"] for r in records)
    if "--random-crop" in flags:
        assert len({tuple(r["crop"]) for r in records}) > 1 and run_json(tmp_path / "straight")["data"]["vae"] == "every step"


def _transparent(path, alpha: int):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (200, 60, 20), alpha
    Image.fromarray(rgba).save(path)
    path.with_suffix(".txt").write_text("a shape\n")


@pytest.mark.parametrize("alpha", [0, 255])
def test_an_image_masked_out_entirely_gives_no_gradient(tmp_path, alpha):
    (tmp_path / "d").mkdir()
    _transparent(tmp_path / "d" / "x.png", alpha)
    out = tmp_path / "o"
    train(out, "--data", tmp_path / "d", "--alpha-mask", "--optim", "torch.optim.SGD", "--lr", "0.5",
          "--batch-size", "1", "--steps", "2")
    up = {k: v for k, v in load_file(out / "pytorch_lora_weights.safetensors").items() if "lora_B" in k}
    # LoRA "up" weights start at zero and move only with a gradient
    assert all(torch.count_nonzero(v) == 0 for v in up.values()) == (alpha == 0)


class ZeroUNet(torch.nn.Module):
    dtype = torch.float32

    def forward(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs):
        return types.SimpleNamespace(sample=torch.zeros_like(sample))


def test_loss_weights_per_pixel_and_per_sample():
    scheduler = DDPMScheduler.from_config(load_config("sdxl_scheduler"))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    args = (ZeroUNet(), scheduler, latents, torch.zeros(2, 77, 64), torch.zeros(2, 32), torch.zeros(2, 6))
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(latents.shape, generator=g)  # what the loss draws first; the target (epsilon)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :4] = 1.0  # left half of each latent
    mask[1] *= 0.5  # and a prior-loss weight of 0.5 on the second sample
    loss = Objective().loss(*args, torch.Generator().manual_seed(4), weight=mask)
    by_hand = ((noise[0, :, :, :4] ** 2).sum() / 256 + 0.5 * (noise[1, :, :, :4] ** 2).sum() / 256) / 2
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_regularization_images_get_the_prior_loss_weight(tmp_path):
    from emotrain.config import resolve_config
    from emotrain.dataset.encode import prepare_data
    from emotrain.dataset.scan import scan_data
    from emotrain.watch.progress import TrainProgress
    from emotrain.sdxl import load_sdxl

    train_dir = write_images(tmp_path / "train", {"a.png": "a", "b.png": "b"})
    reg_dir = write_images(tmp_path / "reg" / "1_person", {"r.png": None})
    cfg = resolve_config(None, {"model": "tiny", "data": str(train_dir), "reg_data": str(tmp_path / "reg"),
                                "prior_loss_weight": 0.25, "resolution": 64, "disk_cache": False})
    progress = TrainProgress(1)
    data = prepare_data(load_sdxl("tiny"), scan_data(cfg), cfg, "cpu", progress, progress.console)
    assert [e.example.subset.is_reg for e in data.entries] == [False, False, True, True]  # one reg draw per train draw
    batch = data.batch([0, 2], torch.Generator().manual_seed(0))
    assert batch.weight.flatten(1).amax(1).tolist() == [1.0, 0.25] and batch.captions == ["a", "person"]


def test_vram_keeps_the_encoders_that_per_draw_data_needs():
    def resident(*flags):
        result = run_cli("vram", "--model", "tiny", "--resolution", "64", "--optim", "emocats", "--rank", "4",
                         "--json", *flags)
        plan = json.loads(result.output)
        return plan["resident_while_training"], plan["optimizers"]["emocats"]["training_step_bytes"], plan
    cached, cached_bytes, plan = resident()
    shuffled, shuffled_bytes, _ = resident("--shuffle-captions")
    cropped, cropped_bytes, _ = resident("--random-crop")
    base = plan["base_bytes_by_component"]
    assert cached == ["unet"] and shuffled == ["unet", "text_encoder", "text_encoder_2"] and cropped == ["unet", "vae"]
    assert shuffled_bytes - cached_bytes == base["text_encoder"] + base["text_encoder_2"]
    assert cropped_bytes - cached_bytes == base["vae"]
