"""Kohya's flattened module names read back exactly, from tables of the models' own
module names; anything not in them (another architecture, another network type) is
refused with one line, never guessed."""

from __future__ import annotations

import re

import pytest
import torch

from emotrain import sdxl
from emotrain.errors import UserError
from emotrain.sdxl.lora import TEXT_TARGETS, UNET_TARGETS
from emotrain.sdxl.tiny import TINY_UNET


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
