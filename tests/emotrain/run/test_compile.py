"""--compile: the UNet's repeated blocks compiled in place (emotrain/sdxl/regions.py).
Against eager runs: the same losses to float rounding, the same keys in the LoRA files
and checkpoints (no ``_orig_mod.``), exact resume within compiled runs, and one line
(exit 2, nothing trained) where the platform cannot compile. The tests compile with
``aot_eager`` (dynamo's tracing and AOT autograd's graphs, run without generating
kernels): inductor's C++ build of the tiny UNet takes minutes on this machine
(benchmarks/RESULTS.md)."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from emotrain.sdxl import regions
from helpers import run_cli, train

COMMON = ["--gradient-checkpointing", "--save-every", "2"]


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setenv(regions.BACKEND_ENV, "aot_eager")


def losses(output):
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def keys(path):
    with safe_open(str(path), "pt") as f:
        return sorted(f.keys())


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_compiled_run_matches_eager_and_resumes_exactly(tmp_path, aot_eager):
    train(tmp_path / "eager", *COMMON, "--steps", "4")
    train(tmp_path / "compiled", *COMMON, "--steps", "4", "--compile")
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 4
    # fp32: the traced graphs' decompositions may round differently, nothing more
    assert compiled == pytest.approx(eager, rel=1e-4), (eager, compiled)
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors", "checkpoints/step-000004/trainable.safetensors"):
        assert keys(tmp_path / "compiled" / name) == keys(tmp_path / "eager" / name)
        assert not any("_orig_mod" in k for k in keys(tmp_path / "compiled" / name))
    # the compiled run as if killed after its step-2 checkpoint, resumed (compiled again) ==
    # its 4 steps straight (a copy with the later checkpoint removed: one compilation less)
    shutil.copytree(tmp_path / "compiled", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step-000004")
    resumed = run_cli("sdxl-lora", "--resume", tmp_path / "split", "--steps", "4").output
    assert "at step 2" in resumed, resumed  # it trained steps 3 and 4 again
    assert json.loads((tmp_path / "split" / "run.json").read_text())["config"]["compile"] is True
    straight, split = (tensors(tmp_path / r / "pytorch_lora_weights.safetensors") for r in ("compiled", "split"))
    assert straight.keys() == split.keys()
    assert all(torch.equal(straight[k], split[k]) for k in straight)


def test_the_blocks_are_compiled_in_place_with_peft_forward_inside(aot_eager):
    from diffusers import UNet2DConditionModel

    from emotrain.lora import fast
    from emotrain.lora.inject import add_lora, unet_lora_config
    from emotrain.sdxl.tiny import TINY_UNET

    unet = UNet2DConditionModel.from_config(TINY_UNET)
    add_lora(unet, unet_lora_config(4, 4, 4, 4, "full"))
    names = [n for n, _ in unet.named_parameters()]
    blocks = regions.repeated_blocks(unet)
    inside = sum(1 for b in blocks for m in b.modules() if isinstance(m, fast._Fast))
    total = sum(1 for m in unet.modules() if isinstance(m, fast._Fast))
    assert fast.uninstall(unet, blocks) == inside > 0
    assert regions.compile_blocks(unet) == len(blocks) > 0
    assert [n for n, _ in unet.named_parameters()] == names  # no _orig_mod. anywhere
    left = [m for m in unet.modules() if isinstance(m, fast._Fast)]
    assert len(left) == total - inside and all(getattr(m, fast.SHADOWS).layers == left for m in left)


def test_a_platform_that_cannot_compile_is_told_in_one_line(tmp_path, monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.delenv(regions.BACKEND_ENV, raising=False)
    monkeypatch.setattr(inductor.cpp, "cxx", (None, "/nonexistent/c++"))
    result = train(tmp_path / "run", "--steps", "2", "--compile", expect=2)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--compile" in lines[0] and "without --compile" in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "lora.safetensors").exists()
