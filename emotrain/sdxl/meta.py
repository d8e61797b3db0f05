"""SDXL without its weights: the four networks on the meta device (shapes, no memory)
for planning, and a real-size UNet with random weights for measuring on a GPU.

``model`` is what --model names, or ``sdxl`` for SDXL 1.0 from the shipped configs. A
single-file checkpoint has SDXL 1.0's architecture, so it plans like ``sdxl``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from .configs import load_config


def _is_sdxl_layout(model: str) -> bool:
    return model == "sdxl" or Path(model).suffix == ".safetensors"


def unet_config(model: str = "sdxl") -> dict:
    from diffusers import UNet2DConditionModel

    if _is_sdxl_layout(model):
        return load_config("sdxl_unet")
    if model in ("tiny", "tiny-vpred"):
        from .tiny import TINY_UNET
        return TINY_UNET
    from .model import resolve_model
    try:
        return UNet2DConditionModel.load_config(resolve_model(model), subfolder="unet")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the UNet config of {model} ({exc})".splitlines()[0]) from None


def meta_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config or load_config("sdxl_unet"))


def _component_configs(model: str) -> dict:
    """(class name, config) of the text encoders and the VAE."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig

    if _is_sdxl_layout(model):
        return {"text_encoder": ("CLIPTextModel", CLIPTextConfig(**load_config("sdxl_text_encoder"))),
                "text_encoder_2": ("CLIPTextModelWithProjection", CLIPTextConfig(**load_config("sdxl_text_encoder_2"))),
                "vae": ("AutoencoderKL", load_config("sdxl_vae"))}
    from .model import resolve_model
    folder = resolve_model(model)  # builds the tiny model on first use: real tensors, outside any meta context
    try:
        return {"text_encoder": ("CLIPTextModel", CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")),
                "text_encoder_2": ("CLIPTextModelWithProjection",
                                   CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")),
                "vae": ("AutoencoderKL", AutoencoderKL.load_config(folder, subfolder="vae"))}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the model configs in {folder} ({exc})".splitlines()[0]) from None


def meta_parts(model: str = "sdxl") -> dict:
    """UNet, both text encoders and VAE on the meta device, frozen (no weights read)."""
    import transformers
    from diffusers import AutoencoderKL

    configs = _component_configs(model)
    modules = {"unet": meta_unet(unet_config(model))}
    with torch.device("meta"):
        for name, (cls, config) in configs.items():
            modules[name] = (AutoencoderKL.from_config(config) if name == "vae"
                             else getattr(transformers, cls)(config))
    for module in modules.values():
        module.requires_grad_(False)
    return modules


def random_unet(model: str, device, dtype):
    """A real UNet with random weights (``sdxl``: SDXL 1.0's shape, built on ``device``;
    a folder or ``tiny``: its own weights), for measuring memory."""
    from diffusers import UNet2DConditionModel

    if _is_sdxl_layout(model):
        if model != "sdxl":
            raise UserError("--measure needs a diffusers folder, 'tiny' or 'sdxl' (random weights), not a single file")
        # No byte counted here depends on the weights' values: random ones spare the
        # download, and building on the device spares minutes of CPU init for 2.6 B params.
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(load_config("sdxl_unet"))
    else:
        from .model import resolve_model
        unet = UNet2DConditionModel.from_pretrained(resolve_model(model), subfolder="unet")
    # diffusers warns on any .to(dtype=...), even a no-op one
    unet.to(device) if dtype == torch.float32 else unet.to(device=device, dtype=dtype)
    return unet

