"""LoRA files on the tiny SDXL: what we write loads whole in diffusers, with alpha, and
reads back into the same numbers."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emotrain.errors import UserError
from helpers import unet_output
from emotrain.lora.formats import load_lora_file, save_lora_file
from emotrain.lora.inject import lora_config_for
from emotrain.lora.live import load_into_model, lora_weights_from_model
from emotrain.lora.weights import LoraWeights
from emotrain.lora.inject import add_lora, lora_module_names, text_encoder_lora_config, unet_lora_config
from emotrain.sdxl import load_sdxl, tiny_sdxl_path


def randomize_lora(module: torch.nn.Module, seed: int) -> None:
    # B starts at zero: perturb both factors so every module contributes.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)




TOKENS = torch.tensor([[49406, 72, 101, 108, 49407, 49407], [49406, 80, 81, 82, 83, 49407]]) % 500


def te_output(te) -> torch.Tensor:
    with torch.no_grad():
        return te(TOKENS, output_hidden_states=True).hidden_states[-2]


def fresh_pipe():
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path())


@pytest.fixture(scope="module")
def trained():
    sdxl = load_sdxl("tiny")
    add_lora(sdxl.unet, unet_lora_config(4, 3, conv_rank=2, conv_alpha=5))
    add_lora(sdxl.text_encoder, text_encoder_lora_config(4, 6))
    add_lora(sdxl.text_encoder_2, text_encoder_lora_config(2, 1))
    for i, m in enumerate((sdxl.unet, sdxl.text_encoder, sdxl.text_encoder_2)):
        randomize_lora(m, i)
    return sdxl


@pytest.fixture(scope="module")
def weights(trained) -> LoraWeights:
    return lora_weights_from_model(trained.unet, trained.text_encoders)


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory, weights):
    return save_lora_file(tmp_path_factory.mktemp("kohya") / "lora.safetensors", weights, "kohya",
                          {"ss_output_name": "t"})


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory, weights):
    folder = tmp_path_factory.mktemp("diffusers")
    save_lora_file(folder, weights, "diffusers")
    return folder


@pytest.fixture(scope="module")
def base_output():
    return unet_output(fresh_pipe().unet)


def assert_same_model(pipe, trained, base_output):
    assert len(lora_module_names(pipe.unet)) == len(lora_module_names(trained.unet)) == 307
    for te_pipe, te in ((pipe.text_encoder, trained.text_encoder), (pipe.text_encoder_2, trained.text_encoder_2)):
        assert len(lora_module_names(te_pipe)) == len(lora_module_names(te)) == 18
    trained_out = unet_output(trained.unet)
    assert (trained_out - base_output).abs().max() > 1e-2  # the LoRA does something
    assert (unet_output(pipe.unet) - trained_out).abs().max() <= 1e-5
    for te_pipe, te in ((pipe.text_encoder, trained.text_encoder), (pipe.text_encoder_2, trained.text_encoder_2)):
        assert (te_output(te_pipe) - te_output(te)).abs().max() <= 1e-5


def test_weights_carry_alpha_and_conv_rank(weights):
    conv1 = weights.modules["unet.down_blocks.0.resnets.0.conv1"]
    assert (conv1.rank, conv1.alpha) == (2, 5)
    q = weights.modules["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert (q.rank, q.alpha) == (4, 3)
    te = weights.modules["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"]
    assert (te.rank, te.alpha) == (2, 1)
    assert len(weights.modules) == 307 + 36


def test_diffusers_file_loads_whole_in_diffusers(trained, diffusers_dir, base_output):
    pipe = fresh_pipe()
    pipe.load_lora_weights(diffusers_dir)
    assert_same_model(pipe, trained, base_output)


def test_kohya_file_loads_whole_in_diffusers(trained, kohya_file, base_output):
    pipe = fresh_pipe()
    pipe.load_lora_weights(str(kohya_file))
    assert_same_model(pipe, trained, base_output)


def test_kohya_file_uses_sgm_names(kohya_file):
    with safe_open(str(kohya_file), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
    bases = {k.split(".")[0] for k in keys}
    assert len(bases) == 307 + 36 and len(alphas) == len(bases)
    assert not any(part in k for k in keys for part in ("down_blocks", "up_blocks", "mid_block"))
    for base in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_out_0",
        "lora_unet_input_blocks_7_1_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_input_blocks_7_1_transformer_blocks_0_ff_net_2",
        "lora_unet_input_blocks_5_1_proj_in", "lora_unet_output_blocks_3_1_proj_out",
        "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_2_0_out_layers_3",
        "lora_unet_input_blocks_1_0_emb_layers_1", "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_6_0_op",
        "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv",
        "lora_unet_output_blocks_8_0_skip_connection",
        "lora_unet_middle_block_0_in_layers_2", "lora_unet_middle_block_1_transformer_blocks_1_attn1_to_k",
        "lora_unet_middle_block_2_emb_layers_1",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_2_mlp_fc2",
    ):
        assert f"{base}.lora_down.weight" in keys and f"{base}.lora_up.weight" in keys, base
    assert alphas["lora_unet_input_blocks_1_0_in_layers_2.alpha"].item() == 5
    assert alphas["lora_unet_input_blocks_1_0_emb_layers_1.alpha"].item() == 3
    assert alphas["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 6
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "3")
    assert '"conv_dim": "2"' in meta["ss_network_args"] and '"conv_alpha": "5"' in meta["ss_network_args"]
    assert meta["ss_output_name"] == "t" and all(isinstance(v, str) for v in meta.values())


def assert_same_weights(a: LoraWeights, b: LoraWeights):
    assert set(a.modules) == set(b.modules)
    for name, m in a.modules.items():
        n = b.modules[name]
        assert m.alpha == n.alpha, name
        assert torch.equal(m.down.float(), n.down.float()) and torch.equal(m.up.float(), n.up.float()), name


def test_round_trip_kohya_to_diffusers(weights, kohya_file, diffusers_dir, tmp_path):
    from_kohya = load_lora_file(kohya_file)
    assert from_kohya.source_format == "kohya" and from_kohya.metadata["ss_output_name"] == "t"
    assert_same_weights(weights, from_kohya)
    save_lora_file(tmp_path / "again.safetensors", from_kohya, "diffusers")
    again = load_lora_file(tmp_path / "again.safetensors")
    assert again.source_format == "diffusers"
    assert_same_weights(weights, again)
    assert_same_weights(weights, load_lora_file(diffusers_dir))


def test_reads_diffusers_named_kohya_keys(weights, tmp_path):
    # Older sd-scripts versions wrote diffusers module paths in kohya keys.
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    tensors = {}
    for full, m in weights.modules.items():
        component, _, name = full.partition(".")
        base = prefixes[component] + name.replace(".", "_")
        tensors.update({f"{base}.lora_down.weight": m.down, f"{base}.lora_up.weight": m.up,
                        f"{base}.alpha": torch.tensor(m.alpha)})
    save_file(tensors, tmp_path / "old.safetensors")
    assert_same_weights(weights, load_lora_file(tmp_path / "old.safetensors"))


def test_load_into_model_continues_training(trained, kohya_file):
    w = load_lora_file(kohya_file)
    sdxl = load_sdxl("tiny")
    for component, model in (("unet", sdxl.unet), ("text_encoder", sdxl.text_encoder),
                             ("text_encoder_2", sdxl.text_encoder_2)):
        add_lora(model, lora_config_for(w, component))
    load_into_model(sdxl.unet, sdxl.text_encoders, w)
    assert (unet_output(sdxl.unet) - unet_output(trained.unet)).abs().max() <= 1e-6
    assert (te_output(sdxl.text_encoder_2) - te_output(trained.text_encoder_2)).abs().max() <= 1e-6


def test_mismatched_file_refused(kohya_file):
    w = load_lora_file(kohya_file)
    sdxl = load_sdxl("tiny")
    add_lora(sdxl.unet, unet_lora_config(4, 3, conv_rank=4, conv_alpha=5))  # conv rank differs from the file
    with pytest.raises(UserError, match=r"unet\.down_blocks\.0\.downsamplers\.0\.conv: .*shapes"):
        load_into_model(sdxl.unet, None, LoraWeights({k: v for k, v in w.modules.items() if k.startswith("unet.")}))
    with pytest.raises(UserError, match=r"text_encoder\.text_model\.encoder\.layers\.0\.mlp\.fc1 but no text_encoder"):
        load_into_model(sdxl.unet, None, w)
    partial = LoraWeights({k: v for k, v in w.modules.items()
                           if k.startswith("unet.") and "attn2.to_k" not in k})
    with pytest.raises(UserError, match=r"unet\.down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k "
                                        r"is not in the LoRA file"):
        load_into_model(sdxl.unet, None, partial)


def test_bad_files_refused(tmp_path, kohya_file):
    with pytest.raises(UserError, match="does not exist"):
        load_lora_file(tmp_path / "nope.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(UserError, match="corrupt"):
        load_lora_file(tmp_path / "garbage.safetensors")
    data = kohya_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_lora_file(tmp_path / "cut.safetensors")
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(2, 2)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(UserError, match="unknown layout"):
        load_lora_file(tmp_path / "ckpt.safetensors")
    save_file({"lora_unet_input_blocks_1_0_in_layers_2.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loha.safetensors")
    with pytest.raises(UserError, match="incomplete: .* lacks its hada_w1_b"):
        load_lora_file(tmp_path / "loha.safetensors")
    (tmp_path / "lora.ckpt").write_bytes(b"x")
    with pytest.raises(UserError, match="pickle"):
        load_lora_file(tmp_path / "lora.ckpt")


def test_writes_are_atomic(weights, tmp_path):
    target = tmp_path / "out.safetensors"
    save_lora_file(target, weights, "kohya")
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_reads_older_diffusers_layouts(weights, tmp_path):
    # The layout diffusers' own convert_state_dict_to_diffusers writes (lora.down / lora_linear_layer).
    from diffusers.utils import convert_state_dict_to_diffusers
    tensors = {}
    for component in ("unet", "text_encoder"):
        peft_sd = {}
        for name, m in weights.component(component).items():
            peft_sd[f"{name}.lora_A.weight"], peft_sd[f"{name}.lora_B.weight"] = m.down, m.up
        tensors.update({f"{component}.{k}": v for k, v in convert_state_dict_to_diffusers(peft_sd).items()})
    save_file(tensors, tmp_path / "old.safetensors")
    read = load_lora_file(tmp_path / "old.safetensors")
    assert len(read.modules) == 307 + 18
    for name, m in read.modules.items():
        want = weights.modules[name]
        assert torch.equal(m.down, want.down) and torch.equal(m.up, want.up)
        assert m.alpha == m.rank  # no alphas in that layout: diffusers' reading too


def test_one_registry_for_every_path(weights, tmp_path):
    from emotrain.cli import LoraFormat
    from emotrain.lora.formats import FORMATS, convert, get_format

    assert [f.value for f in LoraFormat] == list(FORMATS) == ["kohya", "diffusers"]
    for name, fmt in FORMATS.items():
        written = save_lora_file(tmp_path / name, weights, name)  # a folder gets the format's file name
        assert written == tmp_path / name / fmt.file_name
        with safe_open(str(written), "pt") as f:
            keys = list(f.keys())
        assert [n for n, other in FORMATS.items() if other.detect(keys)] == [name]
        read = load_lora_file(written)
        assert read.source_format == name
        assert_same_weights(weights, read)
        assert not set(read.metadata) & set(fmt.layout_keys)
    back = convert(tmp_path / "diffusers", tmp_path / "k", to="kohya")
    assert back == tmp_path / "k" / "lora.safetensors"
    assert_same_weights(weights, load_lora_file(back))
    with pytest.raises(UserError, match="unknown LoRA format 'lycoris': use 'kohya' or 'diffusers'"):
        get_format("lycoris")
