"""SDXL on the meta device: shapes without weights, for planning and benchmarks."""

from __future__ import annotations

import json
from importlib import resources

import torch
from diffusers import UNet2DConditionModel

from .lora import add_lora, unet_lora_config


def load_config(name: str) -> dict:
    """A config shipped with emotrain (``sdxl_unet``, ``sdxl_vae``, ``sdxl_text_encoder``...)."""
    return json.loads(resources.files("emotrain.sdxl.configs").joinpath(f"{name}.json").read_text())


def meta_unet(config: dict | None = None) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config or load_config("sdxl_unet"))


def meta_lora_unet(model: str = "sdxl", rank: int = 8, alpha: float = 8, conv_rank: int | None = None,
                   conv_alpha: float | None = None) -> UNet2DConditionModel:
    """The SDXL 1.0 UNet (or the tiny one) with the training LoRA applied, on the meta device."""
    if model == "sdxl":
        config = load_config("sdxl_unet")
    elif model == "tiny":
        from .tiny import TINY_UNET
        config = TINY_UNET
    else:
        config = UNet2DConditionModel.load_config(model, subfolder="unet")
    unet = meta_unet(config)
    with torch.device("meta"):
        add_lora(unet, unet_lora_config(rank, alpha, conv_rank, conv_alpha))
    return unet
