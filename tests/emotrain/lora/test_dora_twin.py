"""DoRA's diffusers twin: diffusers' own ``StableDiffusionXLPipeline.load_lora_weights``
loads every module of it (UNet and both text encoders, peft's ``use_dora`` layers with
the file's magnitudes), and each loaded layer computes the weight LyCORIS' formula gives
for the kohya/LyCORIS file of the same adapter (kind_math.py), to float rounding; the twin
reads back as DoRA."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from emotrain import sdxl
from emotrain.lora.formats import load_lora_file, save_lora_file
from emotrain.sdxl.keys import name_in_model
from emotrain.sdxl.parts import base_weight, component_models

sys.path.insert(0, str(Path(__file__).parent))
from kind_build import random_weights  # noqa: E402
from kind_math import file_delta  # noqa: E402


@pytest.fixture(scope="module")
def files(tiny_path, tmp_path_factory):
    model = sdxl.load_sdxl(str(tiny_path), torch.float32)
    weights = random_weights("dora", model)
    out = tmp_path_factory.mktemp("dora-twin")
    twin = save_lora_file(out / "pytorch_lora_weights.safetensors", weights, "diffusers")
    kohya = save_lora_file(out / "lora.safetensors", weights, "kohya")
    return model, twin, kohya


def test_twin_loads_whole_in_diffusers_and_equals_lycoris_formula(files, tiny_path):
    model, twin, kohya = files
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_path), torch_dtype=torch.float32)
    pipe.load_lora_weights(str(twin))
    loaded, clean = component_models(pipe), component_models(model)
    groups = {}
    for key, value in load_file(kohya).items():
        base, _, part = key.partition(".")
        groups.setdefault(base, {})[part] = value
    torch.manual_seed(0)
    checked = set()
    for component, part in loaded.items():
        for path, layer in part.named_modules():
            if not isinstance(layer, BaseTunerLayer):
                continue
            assert all(len(layer.lora_magnitude_vector[a].weight) for a in layer.active_adapters), path  # DoRA
            name = sdxl.canonical_name(component, path)
            W = base_weight(clean[component], component, name).detach()
            kohya_key = sdxl.kohya_name(f"{component}.{name}", model.unet.config)
            want_w = W.double() + file_delta(groups[kohya_key], W)
            base = layer.get_base_layer()
            bias = None if base.bias is None else base.bias.double()
            if W.ndim == 2:
                x = torch.randn(3, W.shape[1])
                want = F.linear(x.double(), want_w, bias)
            else:
                x = torch.randn(2, W.shape[1], 6, 6)
                want = F.conv2d(x.double(), want_w, bias, base.stride, base.padding)
            with torch.no_grad():
                got = layer(x).double()
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), path
            checked.add(kohya_key)
    assert checked == set(groups) and len(checked) > 300  # every module of the file, none left


def test_twin_reads_back_as_dora(files):
    _, twin, kohya = files
    a, b = load_lora_file(twin), load_lora_file(kohya)
    assert a.kinds == b.kinds == ("dora",) and set(a.modules) == set(b.modules)
    for name, m in b.modules.items():
        for role, t in m.tensors.items():
            assert torch.equal(a.modules[name].tensors[role], t), (name, role)
        assert a.modules[name].alpha == m.alpha
