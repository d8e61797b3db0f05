"""Kohya's flattened module names read back exactly, from tables of the models' own
module names; anything not in them (another architecture, another network type) is
refused with one line, never guessed."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from emotrain import sdxl
from emotrain.errors import UserError
from emotrain.lora.formats import load_lora_file
from emotrain.sdxl import TEXT_ENCODER_TARGETS, unet_targets

UNET_TARGETS, TEXT_TARGETS = unet_targets("full").pattern, TEXT_ENCODER_TARGETS.pattern
from emotrain.sdxl.tiny import TINY_UNET
from helpers import run_cli, train


def flat(name: str) -> str:
    return name.replace(".", "_")


def test_sgm_mapping_covers_full_sdxl():
    unet = sdxl.meta_unet()
    names = [n for n, _ in unet.named_modules() if re.match(UNET_TARGETS, n)]
    table = sdxl.sgm_block_table(unet.config)
    sgm = {n: sdxl.unet_name_to_sgm(n, table) for n in names}
    assert len(names) == len(set(sgm.values())) == 788
    for n, s in sgm.items():
        assert sdxl.unet_name_from_sgm(sdxl.unflatten(flat(s), "unet"), table) == n
    assert sgm["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert sgm["down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2"] == \
        "input_blocks.8.1.transformer_blocks.9.ff.net.2"
    assert sgm["up_blocks.0.resnets.2.conv_shortcut"] == "output_blocks.2.0.skip_connection"


def test_unet_targets_round_trip_in_both_spellings():
    unet = sdxl.meta_unet()
    table = sdxl.sgm_block_table(unet.config)
    names = [n for n, _ in unet.named_modules() if re.match(UNET_TARGETS, n)]
    for n in names:
        s = sdxl.unet_name_to_sgm(n, table)
        assert sdxl.unflatten(flat(s), "unet") == s
        assert sdxl.unflatten(flat(n), "unet") == n
        key = sdxl.kohya_name(f"unet.{n}")
        assert key == "lora_unet_" + flat(s)
        assert sdxl.module_from_kohya(key) == f"unet.{n}"
        assert sdxl.module_from_kohya("lora_unet_" + flat(n)) == f"unet.{n}"  # older sd-scripts files


@pytest.mark.parametrize("component, config, projection", [
    ("text_encoder", "sdxl_text_encoder", False), ("text_encoder_2", "sdxl_text_encoder_2", True)])
def test_text_encoder_names_round_trip(component, config, projection):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(
            CLIPTextConfig(**sdxl.load_config(config)))
    paths = [p for p, _ in model.named_modules() if p]
    assert len([p for p in paths if re.match(TEXT_TARGETS, p)]) == 6 * model.config.num_hidden_layers
    prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component]
    for path in paths:
        name = sdxl.name_from_model(model, component, path)  # text_model.… however transformers nests it
        assert sdxl.unflatten(flat(name), component) == name
        assert sdxl.kohya_name(f"{component}.{name}") == prefix + flat(name)
        assert sdxl.module_from_kohya(prefix + flat(name)) == f"{component}.{name}"
    layer = "encoder_layers_3_self_attn_q_proj"  # files that leave out the text_model level
    assert sdxl.module_from_kohya(prefix + layer) == f"{component}.text_model.encoder.layers.3.self_attn.q_proj"


def test_tables_are_cached_and_unambiguous():
    for component in sdxl.COMPONENTS:
        table = sdxl.flat_names(component)
        assert sdxl.flat_names(component) is table
        assert None not in table.values()
    tiny = sdxl.flat_names("unet", TINY_UNET)  # its own table: SDXL's layout, fewer transformer blocks
    assert tiny is not sdxl.flat_names("unet") and set(tiny) < set(sdxl.flat_names("unet"))


@pytest.mark.parametrize("key", [
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn3_to_q",  # no attn3
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q_x",  # a compound that does not exist
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to",  # half a compound
    "lora_unet_down_blocks_0_attentions_0_proj_in",  # SD 1.5: attention in the first level
    "lora_unet_input_blocks_1_1_proj_in",  # the same in SGM spelling
    "lora_unet_down_blocks_3_resnets_0_conv1",  # a fourth level
    "lora_te_text_model_encoder_layers_20_self_attn_q_proj",  # CLIP-L has 12 layers
    "lora_te1_text_model_encoder_layers_0_self_attn_qkv",
])
def test_made_up_names_are_refused(key):
    with pytest.raises(UserError) as info:
        sdxl.module_from_kohya(key)
    message = str(info.value)
    assert key in message and "another model architecture" in message and "\n" not in message


@pytest.fixture
def sd15_file(tmp_path):
    """An SD 1.5-style kohya LoRA: diffusers-named UNet keys for a module SDXL lacks, and a
    single text encoder (lora_te_) with a layer CLIP-L does not have, 768 wide."""
    tensors = {}
    for base, width in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320),
                        ("lora_te_text_model_encoder_layers_20_self_attn_q_proj", 768)):
        tensors.update({f"{base}.lora_down.weight": torch.zeros(4, width), f"{base}.lora_up.weight": torch.zeros(width, 4),
                        f"{base}.alpha": torch.tensor(4.0)})
    save_file(tensors, tmp_path / "sd15.safetensors")
    return tmp_path / "sd15.safetensors"


def test_sd15_file_refused_on_load(sd15_file):
    with pytest.raises(UserError, match=r"sd15\.safetensors: lora_\w+ is not a module of the SDXL .*another model "
                                        r"architecture"):
        load_lora_file(sd15_file)


def one_line(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_sd15_file_refused_for_merging_and_training(sd15_file, tmp_path):
    for args in (("merge", "--model", "tiny", "--lora", f"{sd15_file}:0.5", "--output", tmp_path / "m"),
                 ("merge", "--lora", sd15_file, "--lora", sd15_file, "--output", tmp_path / "c.safetensors")):
        assert "another model architecture" in one_line(run_cli(*args, expect=2))
    assert not (tmp_path / "m").exists() and not (tmp_path / "c.safetensors").exists()
    for flag in ("--network-weights", "--base-lora"):
        out = tmp_path / flag.strip("-")
        line = one_line(train(out, flag, sd15_file, "--steps", "1", expect=2))
        assert "sd15.safetensors" in line and "another model architecture" in line
        assert not (out / "lora.safetensors").exists()
