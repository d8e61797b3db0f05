"""--fp8-base: the frozen UNet stored in float8 (e4m3), each layer computed in bf16; the
LoRA stays fp32 and its file is any other LoRA's."""

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from emotrain import sdxl, vram
from emotrain.config import resolve_config
from emotrain.lora.formats import load_lora_file
from emotrain.lora.live import frozen_tensors
from emotrain.lora.start import read_loras, setup_lora
from emotrain.sdxl.fp8 import SKIP, STORAGE, fp8_layers, store_fp8
from helpers import run_cli, run_json, train

BF16 = ["--mixed-precision", "bf16", "--steps", "4", "--save-every", "2"]


def test_a_stored_layer_computes_as_a_bf16_layer_holding_fp8_rounded_weights():
    # The reference: plain torch layers in bf16 whose weights were rounded through float8.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 4, 3),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 7 * 7, 5)).to(torch.bfloat16).requires_grad_(False)
    ref = copy.deepcopy(model)
    assert store_fp8(model) == 3
    for layer in (ref[0], ref[2], ref[4]):
        for p in layer.parameters():
            p.data = p.data.to(STORAGE).to(torch.bfloat16)
    assert model[0].weight.dtype == model[4].bias.dtype == STORAGE and model[1].weight.dtype == torch.bfloat16
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16):
        y, y_ref = model(x).float().pow(2).sum(), ref(x_ref).float().pow(2).sum()
    y.backward()
    y_ref.backward()
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)
    assert x.grad.dtype == torch.float32  # the input's own dtype back


def _cfg(**changes):
    return resolve_config(None, {"model": "tiny", "mixed_precision": "bf16", "fp8_base": True, "rank": 4, **changes},
                          needs_data=False)


def test_the_tiny_unet_in_fp8_keeps_the_lora_norms_and_skipped_layers_and_matches_the_plan(tiny_path):
    cfg = _cfg()
    model = sdxl.load_sdxl(str(tiny_path), torch.bfloat16)
    named = setup_lora(model, cfg)
    unet = model.unet
    stored = fp8_layers(unet)
    assert stored and all(p.dtype == STORAGE for m in stored.values() for p in m.parameters(recurse=False))
    assert named and all(p.dtype == torch.float32 and p.requires_grad for p in named.values())
    for name, module in unet.named_modules():
        plain = name.replace(".base_layer", "")
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or plain in ("conv_in", "conv_out") \
                or plain.startswith(("time_embedding.", "add_embedding.")):
            assert name not in stored and all(p.dtype == torch.bfloat16 for p in module.parameters(recurse=False))
    assert any(isinstance(m, torch.nn.GroupNorm) for m in unet.modules()) and len(SKIP) == 5
    # The plan (meta device, no weights) counts what the loaded model holds, byte for byte.
    held = sum(t.untyped_storage().nbytes() for t in frozen_tensors(unet))
    assert vram.plan(cfg, activations=False)["base_bytes_by_component"]["unet"] == held
    bf16 = vram.plan(_cfg(fp8_base=False), activations=False)["base_bytes_by_component"]["unet"]
    stored_values = sum(p.numel() for m in stored.values() for p in m.parameters(recurse=False))
    assert bf16 - held == stored_values  # one byte saved per stored value


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    train(root / "bf16", *BF16)
    train(root / "fp8", *BF16, "--fp8-base")
    return root


def test_the_loss_with_fp8_storage_stays_near_bf16(runs):
    bf16, fp8 = run_json(runs / "bf16")["losses"], run_json(runs / "fp8")["losses"]
    assert len(bf16) == len(fp8) == 4 and bf16 != fp8  # the storage did change the computation
    # e4m3 keeps 3 mantissa bits: each stored weight is off by at most 2^-4 (6.25%) of
    # itself, about 1.8% rms, and a layer's sums average those errors out. The step loss
    # (~1.1: mostly the noise's own variance) moved by 0.05-0.3% when this was written;
    # the tolerance, 1% relative per step, allows that rounding and catches a broken cast
    # (a weight read at the wrong scale or dtype moves it by far more).
    for a, b in zip(bf16, fp8):
        assert abs(a - b) <= 0.01 * abs(a), (bf16, fp8)


def test_the_fp8_runs_lora_is_any_other_lora(runs, tmp_path):
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(runs / "bf16" / name), load_file(runs / "fp8" / name)
        assert a.keys() == b.keys()
        assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
        with safe_open(runs / "bf16" / name, "pt") as fa, safe_open(runs / "fp8" / name, "pt") as fb:
            assert (fa.metadata() or {}).keys() == (fb.metadata() or {}).keys()
    a, b = load_lora_file(runs / "bf16" / "lora.safetensors"), load_lora_file(runs / "fp8" / "lora.safetensors")
    assert a.modules.keys() == b.modules.keys() and a.kinds == b.kinds == ("lora",)
    # It continues a run like any other file: read and fitted into the model (--network-weights).
    start, _ = read_loras(_cfg(fp8_base=False, network_weights=str(runs / "fp8" / "lora.safetensors")))
    assert start.modules.keys() == a.modules.keys()


def test_resume_with_fp8_base_is_exact(runs, tmp_path):
    split = tmp_path / "split"
    train(split, *BF16[:-4], "--steps", "2", "--fp8-base")
    run_cli("sdxl-lora", "--resume", split, "--steps", "4")
    a, b = load_file(runs / "fp8" / "pytorch_lora_weights.safetensors"), load_file(split / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run_json(split)["losses"] == run_json(runs / "fp8")["losses"]
