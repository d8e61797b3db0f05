"""What a run leaves behind works in other tools, and the stacking commands on real runs."""

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from emotrain.config import resolve_config
from emotrain.lora.inject import add_lora, lora_module_names, unet_lora_config
from emotrain.sdxl import load_sdxl
from emotrain.lora.start import setup_lora
from helpers import run_cli, run_json, train, unet_inputs

SGM_KINDS = {  # module type -> a key fragment sd-scripts' SDXL naming uses for it
    "attention": "_attn1_to_q.", "cross-attention": "_attn2_to_k.", "feed-forward": "_ff_net_0_proj.",
    "proj_in": "_1_proj_in.", "resnet conv1": "_in_layers_2.", "resnet conv2": "_out_layers_3.",
    "time_emb_proj": "_emb_layers_1.", "conv_shortcut": "_skip_connection.", "downsampler": "_0_op.",
    "upsampler": "_2_conv.", "middle block": "lora_unet_middle_block_1_", "output blocks": "lora_unet_output_blocks_",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    train(out, "--optim", "emocats", "--steps", "3", "--alpha", "3", "--conv-rank", "2", "--conv-alpha", "5",
          "--lr", "3e-3")
    return out




def reference_unet(run_dir):
    """The trained UNet rebuilt independently: peft injection plus the checkpoint's exact
    parameters (no emotrain file reader involved)."""
    cfg = run_json(run_dir)["config"]
    sdxl = load_sdxl("tiny")
    add_lora(sdxl.unet, unet_lora_config(cfg["rank"], cfg["alpha"], cfg["conv_rank"], cfg["conv_alpha"]))
    params = load_file(run_dir / "checkpoints" / "step-000003" / "trainable.safetensors")
    sdxl.unet.load_state_dict({k.removeprefix("unet."): v for k, v in params.items()}, strict=False)
    return sdxl.unet


@pytest.mark.parametrize("filename", ["lora.safetensors", "pytorch_lora_weights.safetensors"])
def test_outputs_load_in_diffusers(trained, tiny_path, filename):
    ref = reference_unet(trained)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_path)
    base = pipe.unet(**unet_inputs(pipe.unet)).sample
    pipe.load_lora_weights(str(trained / filename))
    assert len(lora_module_names(pipe.unet)) == len(lora_module_names(ref)) == 307  # nothing dropped
    with torch.no_grad():
        want = ref(**unet_inputs(ref)).sample
        got = pipe.unet(**unet_inputs(pipe.unet)).sample
    assert (want - base).abs().max() > 1e-3  # the LoRA matters, so the comparison means something
    assert (got - want).abs().max() <= 1e-5


def test_kohya_file_names_and_alpha(trained):
    with safe_open(str(trained / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
    for kind, fragment in SGM_KINDS.items():
        assert any(fragment in k for k in keys), f"no {kind} LoRA ({fragment}) in the kohya file"
    assert not any("down_blocks" in k or "resnets" in k for k in keys)  # SGM names only
    alphas = {k: float(v) for k, v in tensors.items()}
    assert len(alphas) == 307
    assert alphas["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"] == 3.0
    assert alphas["lora_unet_input_blocks_1_0_in_layers_2.alpha"] == 5.0  # 3x3 conv: conv alpha


def test_network_weights_continue_from_the_file(trained, tmp_path):
    # Rank and alpha come from the file, whatever the command line's defaults.
    cfg = resolve_config(None, {"model": "tiny", "data": "demo", "rank": 8,
                                "network_weights": str(trained / "lora.safetensors")})
    sdxl = load_sdxl("tiny")
    setup_lora(sdxl, cfg)
    ref = reference_unet(trained)
    with torch.no_grad():
        assert torch.equal(sdxl.unet(**unet_inputs(sdxl.unet)).sample, ref(**unet_inputs(ref)).sample)
    out = tmp_path / "more"
    train(out, "--network-weights", trained / "pytorch_lora_weights.safetensors", "--steps", "2", "--rank", "8")
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.get_tensor("lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight").shape[0] == 2
        assert f.get_tensor("lora_unet_input_blocks_4_1_proj_in.lora_down.weight").shape[0] == 4


def test_mismatching_network_weights_are_refused(trained, tmp_path):
    tensors = load_file(trained / "lora.safetensors")
    key = "lora_unet_input_blocks_4_1_proj_in.lora_down.weight"
    tensors[key] = torch.zeros(4, 7)  # wrong input width for this model
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad)
    out = tmp_path / "out"
    result = train(out, "--network-weights", bad, "--steps", "1", expect=2)
    assert "input_blocks_4_1_proj_in" in result.output or "proj_in" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (out / "lora.safetensors").exists()


def test_train_on_top_of_a_merged_lora(trained, tmp_path):
    plain, stacked = tmp_path / "plain", tmp_path / "stacked"
    train(plain, "--steps", "2")
    train(stacked, "--steps", "2", "--base-lora", f"{trained / 'lora.safetensors'}:0.8")
    assert run_json(plain)["losses"][0] != run_json(stacked)["losses"][0]  # the base changed
    assert load_file(stacked / "lora.safetensors").keys() == load_file(plain / "lora.safetensors").keys()


def test_merge_combine_convert_commands(trained, tmp_path, tiny_path):
    lora = trained / "lora.safetensors"
    folder = tmp_path / "merged"
    result = run_cli("merge", "--model", "tiny", "--lora", f"{lora}:0.5", "--output", folder)
    assert "merged" in result.output
    merged = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_path)
    pipe.load_lora_weights(str(lora), adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[0.5])
    with torch.no_grad():
        got = merged.unet(**unet_inputs(merged.unet)).sample
        want = pipe.unet(**unet_inputs(pipe.unet)).sample
    assert (got - want).abs().max() <= 1e-4

    combined = tmp_path / "c.safetensors"
    run_cli("merge", "--lora", lora, "--lora", f"{trained / 'pytorch_lora_weights.safetensors'}:0.5",
            "--output", combined)
    with safe_open(str(combined), "pt") as f:  # exact: ranks add up (4 + 4)
        assert f.get_tensor("lora_unet_input_blocks_4_1_proj_in.lora_down.weight").shape[0] == 8
    result = run_cli("merge", "--lora", lora, "--lora", lora, "--output", tmp_path / "r2.safetensors", "--rank", "2")
    assert "error" in result.output.lower()

    out = tmp_path / "conv.safetensors"
    run_cli("convert", lora, out, "--to", "diffusers")
    back = tmp_path / "back.safetensors"
    run_cli("convert", out, back, "--to", "kohya")
    a, b = load_file(lora), load_file(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = run_cli("convert", tmp_path / "missing.safetensors", out, "--to", "kohya", expect=2)
    assert "missing.safetensors" in result.output


def test_vram_command(tmp_path):
    # what `emotrain vram --model sdxl --rank 8` plans, its activations left out (an SDXL
    # trace costs about a CPU-minute; the CLI's traces run on the tiny model in tests/emotrain/vram/)
    from emotrain import vram
    from emotrain.config import TrainConfig
    plan = vram.plan(TrainConfig(model="sdxl", rank=8), "all", "both", activations=False)
    assert plan["lora_params"] == 24_593_920
    for key in ("emosens", "emosens-shadow", "emoairy", "emocats", "adamw", "adamw8bit", "adafactor", "lion"):
        assert {"state_bytes", "total_bytes"} <= set(plan["optimizers"][key])
    assert plan["optimizers"]["emosens"]["state_bytes"] == 2 * 4 * 24_593_920
    measured = json.loads(run_cli("vram", "--model", "tiny", "--rank", "4", "--resolution", "64", "--measure",
                                  "--measure-steps", "2", "--optim", "emoairy,emocats", "--json").stdout)  # bar: stderr
    assert all(row["match"] for row in measured["optimizers"].values())
