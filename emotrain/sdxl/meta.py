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
from .lora import add_lora, lora_config_for_run, unet_lora_config


def _is_sdxl_layout(model: str) -> bool:
    return model == "sdxl" or Path(model).suffix == ".safetensors"


def unet_config(model: str = "sdxl") -> dict:
    from diffusers import UNet2DConditionModel

    if _is_sdxl_layout(model):
        return load_config("sdxl_unet")
    if model == "tiny":
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


def meta_lora_unet(model: str = "sdxl", rank: int = 8, alpha: float = 8, conv_rank: int | None = None,
                   conv_alpha: float | None = None, targets: str = "full"):
    """The UNet with a training LoRA applied, on the meta device."""
    unet = meta_unet(unet_config(model))
    with torch.device("meta"):
        add_lora(unet, unet_lora_config(rank, alpha, conv_rank, conv_alpha, targets))
    return unet


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


def meta_sdxl(cfg, lora_configs: dict | None = None) -> dict:
    """UNet, both text encoders and VAE on the meta device with the LoRA ``cfg`` trains.
    ``lora_configs``: component -> peft config where it is given (the LoRA file of
    --network-weights, whose ranks and targets win)."""
    import transformers
    from diffusers import AutoencoderKL

    model = cfg.model or "sdxl"
    configs = _component_configs(model)
    modules = {"unet": meta_unet(unet_config(model))}
    with torch.device("meta"):
        for name, (cls, config) in configs.items():
            modules[name] = (AutoencoderKL.from_config(config) if name == "vae"
                             else getattr(transformers, cls)(config))
        for name, module in modules.items():
            module.requires_grad_(False)
            if name == "vae" or (name != "unet" and not cfg.train_text_encoders):
                continue
            # As training does: the file's LoRA where it has one, else a fresh one.
            add_lora(module, (lora_configs or {}).get(name) or lora_config_for_run(cfg, name))
    return modules


def random_lora_unet(model: str, lora_config, device, dtype):
    """A real UNet with random weights (``sdxl``: SDXL 1.0's shape, built on ``device``;
    a folder or ``tiny``: its own weights) and the LoRA applied, for measuring memory."""
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
    add_lora(unet, lora_config)
    unet.to(device)
    return unet

