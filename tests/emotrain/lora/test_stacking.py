"""Stacking on the tiny SDXL: merged weights, combined LoRAs and converted files all
reproduce what diffusers computes with the LoRAs applied as adapters."""

from __future__ import annotations

import os

import pytest
import torch

from emotrain.errors import UserError
from helpers import unet_output
from emotrain.lora.formats import convert, load_lora_file, save_lora_file
from emotrain.lora.inject import lora_config_for
from emotrain.lora.live import load_into_model, lora_weights_from_model
from emotrain.lora.weights import LoraWeights
from emotrain.lora.inject import add_lora, text_encoder_lora_config, unet_lora_config
from emotrain.sdxl import load_sdxl, tiny_sdxl_path
from emotrain.lora.stacking import apply_base_loras, combine, merge_into_base, parse_lora_spec, save_merged_pipeline

WA, WB = 0.7, -0.4


def randomize_lora(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)




def te_output(te):
    ids = torch.tensor([[49406, 65, 66, 67, 49407], [49406, 90, 91, 49407, 49407]]) % 500
    with torch.no_grad():
        return te(ids, output_hidden_states=True).hidden_states[-2]


def fresh_pipe():
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path())


@pytest.fixture(scope="module")
def lora_a() -> LoraWeights:
    """Full-layer LoRA on the UNet and both text encoders, conv rank/alpha of its own."""
    sdxl = load_sdxl("tiny")
    add_lora(sdxl.unet, unet_lora_config(4, 3, conv_rank=2, conv_alpha=5))
    add_lora(sdxl.text_encoder, text_encoder_lora_config(4, 6))
    add_lora(sdxl.text_encoder_2, text_encoder_lora_config(2, 1))
    for i, m in enumerate((sdxl.unet, sdxl.text_encoder, sdxl.text_encoder_2)):
        randomize_lora(m, 10 + i)
    return lora_weights_from_model(sdxl.unet, sdxl.text_encoders)


@pytest.fixture(scope="module")
def lora_b() -> LoraWeights:
    """Another rank, UNet only, and without the up-block ResNets: modules only A has."""
    sdxl = load_sdxl("tiny")
    add_lora(sdxl.unet, unet_lora_config(3, 2, conv_rank=3, conv_alpha=1.5))
    randomize_lora(sdxl.unet, 20)
    full = lora_weights_from_model(sdxl.unet)
    return LoraWeights({k: v for k, v in full.modules.items() if not k.startswith("unet.up_blocks.1.resnets")})


@pytest.fixture(scope="module")
def files(tmp_path_factory, lora_a, lora_b):
    root = tmp_path_factory.mktemp("loras")
    return {"a": save_lora_file(root / "a.safetensors", lora_a, "kohya"),
            "b": save_lora_file(root / "b", lora_b, "diffusers")}


@pytest.fixture(scope="module")
def merged(lora_a, lora_b):
    sdxl = load_sdxl("tiny")
    merge_into_base(sdxl, [(lora_a, WA), (lora_b, WB)])
    return sdxl


def test_merge_equals_diffusers_adapters(merged, files):
    pipe = fresh_pipe()
    pipe.load_lora_weights(str(files["a"]), adapter_name="a")
    pipe.load_lora_weights(files["b"].parent, adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[WA, WB])
    base = unet_output(fresh_pipe().unet)
    want = unet_output(pipe.unet)
    assert (want - base).abs().max() > 1e-2
    assert (unet_output(merged.unet) - want).abs().max() <= 1e-4
    for te_pipe, te in ((pipe.text_encoder, merged.text_encoder), (pipe.text_encoder_2, merged.text_encoder_2)):
        assert (te_output(te_pipe) - te_output(te)).abs().max() <= 1e-4


def test_weight_scales_the_delta_once(lora_a):
    base = load_sdxl("tiny")
    half = load_sdxl("tiny")
    full = load_sdxl("tiny")
    merge_into_base(half, [(lora_a, 0.5)])
    merge_into_base((full.unet, full.text_encoders), [(lora_a, 1.0)])
    for name in ("down_blocks.0.resnets.0.conv1.weight", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                 "up_blocks.0.upsamplers.0.conv.weight"):
        w0, wh, wf = (dict(m.unet.named_parameters())[name] for m in (base, half, full))
        assert (wf - w0).abs().max() > 1e-3
        torch.testing.assert_close(wh - w0, 0.5 * (wf - w0), atol=1e-6, rtol=1e-5)
    assert parse_lora_spec("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert parse_lora_spec("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)
    assert parse_lora_spec("a:b.safetensors:-1") == ("a:b.safetensors", -1.0)


def test_merged_folder_loads_with_from_pretrained(merged, lora_a, lora_b, files, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    out = save_merged_pipeline("tiny", [(load_lora_file(files["a"]), WA), (lora_b, WB)], tmp_path / "merged")
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert (unet_output(pipe.unet) - unet_output(merged.unet)).abs().max() <= 1e-5
    assert (te_output(pipe.text_encoder_2) - te_output(merged.text_encoder_2)).abs().max() <= 1e-5
    with pytest.raises(UserError, match="already exists"):
        save_merged_pipeline("tiny", [(lora_b, 1.0)], out)


def with_lora(weights: LoraWeights):
    sdxl = load_sdxl("tiny")
    for component, model in (("unet", sdxl.unet), ("text_encoder", sdxl.text_encoder),
                             ("text_encoder_2", sdxl.text_encoder_2)):
        config = lora_config_for(weights, component)
        if config is not None:
            add_lora(model, config)
    load_into_model(sdxl.unet, sdxl.text_encoders, weights)
    return sdxl


def test_exact_combine_equals_the_sum(merged, lora_a, lora_b, tmp_path):
    combined, report = combine([(lora_a, WA), (lora_b, WB)])
    assert report.exact and report.overall == 0 and "exact" in report.summary()
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert combined.modules[name].rank == 4 + 3 and combined.modules[name].alpha == 7
    assert combined.modules["unet.up_blocks.1.resnets.0.conv1"].rank == 2  # only in A
    assert combined.modules["unet.down_blocks.0.resnets.0.conv1"].rank == 2 + 3
    for name, m in combined.modules.items():
        want = WA * lora_a.modules[name].delta() if name in lora_a.modules else 0
        want = want + (WB * lora_b.modules[name].delta() if name in lora_b.modules else 0)
        torch.testing.assert_close(m.delta(), want, atol=1e-6, rtol=1e-5)
    model = with_lora(combined)
    assert (unet_output(model.unet) - unet_output(merged.unet)).abs().max() <= 1e-4
    assert (te_output(model.text_encoder) - te_output(merged.text_encoder)).abs().max() <= 1e-4
    # and it survives a file round trip through diffusers
    pipe = fresh_pipe()
    pipe.load_lora_weights(save_lora_file(tmp_path / "c.safetensors", combined, "diffusers").parent,
                           weight_name="c.safetensors")
    assert (unet_output(pipe.unet) - unet_output(merged.unet)).abs().max() <= 1e-4


def test_svd_combine_reports_its_error(lora_a, lora_b):
    loras = [(lora_a, WA), (lora_b, WB)]
    combined, report = combine(loras, rank=3, conv_rank=2)
    assert not report.exact and report.overall > 0
    lost = total = 0.0
    for name, m in combined.modules.items():
        exact = sum(w * l.modules[name].delta().double() for l, w in loras if name in l.modules)
        err = (m.delta().double() - exact).norm()
        norm = exact.norm()
        assert abs(float(err / norm) - report.errors[name]) <= 1e-4, name
        lost += float(err) ** 2
        total += float(norm) ** 2
        assert m.rank == report.ranks[name] <= (2 if m.is_conv and m.down.shape[-1] == 3 else 3)
        assert m.scale == 1
    assert abs((lost / total) ** 0.5 - report.overall) <= 1e-4
    assert report.max_error >= report.overall
    # a modules whose parts already fit the rank is refactored without loss
    assert report.errors["unet.up_blocks.1.resnets.0.conv1"] <= 1e-6
    _, roomy = combine(loras, rank=64)
    assert roomy.max_error <= 1e-6


def test_convert_round_trips(lora_a, files, tmp_path):
    d = convert(files["a"], tmp_path / "as_diffusers", to="diffusers")
    k = convert(d, tmp_path / "back.safetensors", to="kohya")
    for path in (d, k):
        w = load_lora_file(path)
        assert set(w.modules) == set(lora_a.modules)
        for name, m in lora_a.modules.items():
            n = w.modules[name]
            assert n.alpha == m.alpha and torch.equal(n.down, m.down) and torch.equal(n.up, m.up)
    assert load_lora_file(k).metadata["ss_network_module"] == "networks.lora"
    with pytest.raises(UserError, match="unknown LoRA format"):
        convert(files["a"], tmp_path / "x", to="lycoris")


def test_apply_base_loras_then_train_on_top(merged, lora_a, lora_b):
    sdxl = load_sdxl("tiny")
    apply_base_loras(sdxl.unet, sdxl.text_encoders, [(lora_a, WA), (lora_b, WB)])
    add_lora(sdxl.unet, unet_lora_config(2, 2))  # the new LoRA starts at zero change
    assert (unet_output(sdxl.unet) - unet_output(merged.unet)).abs().max() <= 1e-6


def test_merge_refuses_foreign_modules(lora_a):
    sdxl = load_sdxl("tiny")
    bogus = LoraWeights({"unet.down_blocks.7.resnets.0.conv1": lora_a.modules["unet.down_blocks.0.resnets.0.conv1"]})
    with pytest.raises(UserError, match=r"unet\.down_blocks\.7\.resnets\.0\.conv1"):
        merge_into_base(sdxl, [(bogus, 1.0)])
    wrong = LoraWeights({"unet.down_blocks.1.resnets.0.conv1": lora_a.modules["unet.down_blocks.0.resnets.0.conv1"]})
    with pytest.raises(UserError, match="another model"):
        merge_into_base(sdxl, [(wrong, 1.0)])
