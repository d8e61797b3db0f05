"""DoRA, LoHa and LoKr through the real command line: each trains the tiny model, saves a
file with LyCORIS' keys whose change equals the trained model's (computed from the file
with LyCORIS' own definitions, kind_math.py), resumes bit-exact, continues from its file,
bakes into a model, converts, combines where the math allows, and plans its memory."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

from emotrain.config import TrainConfig
from emotrain.lora.inject import add_lora, lora_config_for_run
from emotrain.sdxl import kohya_name
from helpers import run_cli, train, unet_output

sys.path.insert(0, str(Path(__file__).parent))
from kind_math import file_delta  # noqa: E402

KINDS = ["dora", "loha", "lokr"]
PARTS = {"dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
         "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
         "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}}


@pytest.fixture(scope="module", params=KINDS)
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    # LoKr with factor 4: w1 4x4, w2 a rank-4 product on the wider layers, full on the narrow ones
    extra = ["--lokr-factor", "4"] if request.param == "lokr" else []
    train(out, "--adapter", request.param, *extra, "--steps", "4", "--save-every", "2")
    return request.param, out


def groups(path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for key, value in load_file(path).items():
        base, _, part = key.partition(".")
        out.setdefault(base, {})[part] = value
    return out


def test_file_has_lycoris_keys_and_metadata(run):
    kind, out = run
    modules = groups(out / "lora.safetensors")
    assert set().union(*map(set, modules.values())) <= PARTS[kind]
    assert all("alpha" in parts for parts in modules.values())
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == {"dora": "lora", "loha": "loha", "lokr": "lokr"}[kind]
    assert args.get("dora_wd") == ("True" if kind == "dora" else None)
    assert kind != "lokr" or args["factor"] == "4"
    # diffusers loads DoRA (through peft): the twin; LoHa and LoKr it cannot: none
    assert (out / "pytorch_lora_weights.safetensors").exists() == (kind == "dora")


def test_file_delta_equals_the_trained_models_weight(run, tiny_path):
    """The trained adapter (the run's last checkpoint, put into a fresh injection as
    training made it) against the file's change, by LyCORIS' formula, module by module."""
    kind, out = run
    unet = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet")
    cfg = TrainConfig(**json.loads((out / "run.json").read_text())["config"])
    add_lora(unet, lora_config_for_run(cfg))
    trained = load_file(out / "checkpoints" / "step-000004" / "trainable.safetensors")
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in trained.items():
            params[name.removeprefix("unet.")].copy_(value)
    modules = groups(out / "lora.safetensors")
    checked = 0
    torch.manual_seed(0)
    for path, layer in unet.named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        base = layer.get_base_layer()
        W = base.weight.detach()
        delta = file_delta(modules.pop(kohya_name(f"unet.{path}", unet.config)), W).float()
        if isinstance(base, torch.nn.Linear):
            x = torch.randn(3, W.shape[1])
            want = F.linear(x, W + delta, base.bias)
        else:
            x = torch.randn(2, W.shape[1], 6, 6)
            want = F.conv2d(x, W + delta, base.bias, base.stride, base.padding)
        with torch.no_grad():
            got = layer(x)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), path
        assert delta.abs().max() > 0, path  # trained: not the zero start
        checked += 1
    assert checked > 100 and not modules  # every module of the file is a layer of the model


def test_dora_twin_in_diffusers_equals_the_trained_model(run, tiny_path):
    """diffusers' own load_lora_weights on the run's twin: the UNet's output equals the
    trained model's (the last checkpoint, injected as training made it)."""
    kind, out = run
    if kind != "dora":
        pytest.skip("diffusers loads no LoHa/LoKr: no twin")
    unet = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet")
    cfg = TrainConfig(**json.loads((out / "run.json").read_text())["config"])
    add_lora(unet, lora_config_for_run(cfg), fast=False)
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in load_file(out / "checkpoints" / "step-000004" / "trainable.safetensors").items():
            params[name.removeprefix("unet.")].copy_(value)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_path, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    loaded = sum(isinstance(m, BaseTunerLayer) and bool(m.lora_magnitude_vector) for m in pipe.unet.modules())
    assert loaded == sum(isinstance(m, BaseTunerLayer) for m in unet.modules()) > 100
    want, got = unet_output(unet), unet_output(pipe.unet)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (unet_output(UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet")) - want).abs().max() > 1e-4


def test_resume_is_bit_exact(run, tmp_path):
    kind, out = run
    split = tmp_path / "split"
    shutil.copytree(out, split)
    shutil.rmtree(split / "checkpoints" / "step-000004")
    (split / "lora.safetensors").unlink()
    run_cli("sdxl-lora", "--resume", split)
    a, b = load_file(out / "lora.safetensors"), load_file(split / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_network_weights_continue_in_the_files_kind(run, tmp_path):
    kind, out = run
    more = tmp_path / "more"
    # no --adapter: the file's kind wins; a step too small to move it: the file comes back
    train(more, "--network-weights", out / "lora.safetensors", "--steps", "1", "--lr", "1e-9")
    a, b = load_file(out / "lora.safetensors"), load_file(more / "lora.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # (a fresh start would have zero factors: lokr_w2_b, hada_w2_b, lora_up)
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_merge_into_model_bakes_the_files_change(run, tmp_path, tiny_path):
    kind, out = run
    merged = tmp_path / "merged"
    run_cli("merge", "--model", "tiny", "--lora", f"{out / 'lora.safetensors'}:0.5", "--output", merged)
    base = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet")
    baked = UNet2DConditionModel.from_pretrained(merged, subfolder="unet")
    modules = groups(out / "lora.safetensors")
    base_params, baked_params = dict(base.named_parameters()), dict(baked.named_parameters())
    for path, m in base.named_modules():
        name = kohya_name(f"unet.{path}", base.config) if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) else None
        if name in modules:
            W = base_params[f"{path}.weight"].detach()
            want = W + 0.5 * file_delta(modules.pop(name), W).float()
            assert torch.allclose(baked_params[f"{path}.weight"], want, atol=1e-6, rtol=1e-5), path
    assert not modules


def test_convert_combine_and_plan(run, tmp_path):
    kind, out = run
    lora = out / "lora.safetensors"
    back = tmp_path / "same.safetensors"
    run_cli("convert", lora, back, "--to", "kohya")
    a, b = load_file(lora), load_file(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if kind == "dora":  # the twin's layout, and back: the same tensors
        run_cli("convert", lora, tmp_path / "d.safetensors", "--to", "diffusers")
        run_cli("convert", tmp_path / "d.safetensors", tmp_path / "k.safetensors", "--to", "kohya")
        c = load_file(tmp_path / "k.safetensors")
        assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    else:
        refused = run_cli("convert", lora, tmp_path / "d.safetensors", "--to", "diffusers", expect=2)
        assert "diffusers" in refused.output and len(refused.output.strip().splitlines()) == 1
    # several files of these kinds: no exact sum; --rank compresses to a plain LoRA with the error
    run_cli("merge", "--lora", lora, "--lora", lora, "--output", tmp_path / "c.safetensors", expect=2)
    if kind != "dora":  # DoRA's change needs the base weights: merge --model only
        result = run_cli("merge", "--lora", lora, "--lora", f"{lora}:0.5", "--rank", "2",
                         "--output", tmp_path / "c.safetensors")
        assert "SVD combine" in result.output
        parts = set().union(*map(set, groups(tmp_path / "c.safetensors").values()))
        assert parts == {"lora_down.weight", "lora_up.weight", "alpha"}
    plan = json.loads(run_cli("vram", "--model", "tiny", "--resolution", "64", "--rank", "4", "--adapter", kind,
                              *(["--lokr-factor", "4"] if kind == "lokr" else []),
                              "--optim", "emoairy", "--json").stdout)
    trained = load_file(out / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert plan["lora_params"] == sum(t.numel() for t in trained.values())
    assert plan["lora_tensors"] == len(trained)
    measured = json.loads((out / "run.json").read_text())["memory"]["optimizer_state_bytes"]
    assert plan["optimizers"]["emoairy"]["state_bytes"] == measured  # the run's own optimizer state
    assert (plan["adapter_transient_bytes"] > 0) == (kind == "dora")
