"""ComfyUI's own loader (comfy/lora.py and comfy/weight_adapter, from a snapshot: the
EMOTRAIN_COMFYUI folder or /work/comfyui-snapshot; skipped without one) on each kind's
kohya/LyCORIS file, UNet and both text encoders: every key is mapped and the change
ComfyUI applies equals emotrain's. The check itself is benchmarks/comfy_loader.py (which
trains the files through the CLI; here they are built with random adapters, so that no
tensor is at its zero start). DoRA: ComfyUI (at least to a125cd84) divides by the row norm
of the base weight where LyCORIS and peft divide by the merged weight's (Comfy-Org/ComfyUI
PR #15458, open): its change is checked against that formula, and against ours once fixed."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[3] / "benchmarks"))
import comfy_loader  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from kind_build import random_weights  # noqa: E402

ROOT = comfy_loader.snapshot_root()
pytestmark = pytest.mark.skipif(ROOT is None, reason="no ComfyUI snapshot (EMOTRAIN_COMFYUI) or einops missing")


@pytest.fixture(scope="module")
def model():
    from emotrain import sdxl
    return sdxl.load_sdxl(sdxl.resolve_model("tiny"), torch.float32)


def build_file(kind: str, model, path: Path) -> Path:
    from emotrain.lora.formats import save_lora_file
    return save_lora_file(path, random_weights(kind, model), "kohya")


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_comfyui_maps_every_key_and_applies_our_change(kind, model, tmp_path):
    r = comfy_loader.check(build_file(kind, model, tmp_path / "lora.safetensors"), model, ROOT)
    assert r["unloaded"] == []  # ComfyUI's load_lora left no key
    assert r["modules"] == r["patched"] > 300  # every module of the file, UNet and text encoders
    tol = 4e-7 * (r["max_weight"] + r["max_delta"])  # float32 rounding of the patched weight W + change
    if kind == "dora":
        assert min(r["max_diff"], r["dora_base_norm_diff"]) <= tol, r
    else:
        assert r["max_diff"] <= tol, r
