"""Which SDXL layers get a LoRA, and how peft puts it there.

Full-layer means what kohya calls LoCon on SDXL: every attention projection, the
feed-forward, the transformer proj_in/proj_out, the ResNet convolutions and their
time-embedding projection, and the down/up-sampler convolutions. 3x3 convolutions take
their own rank and alpha (``conv_rank``/``conv_alpha``); 1x1 shortcuts count as linear
layers, as in sd-scripts.
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, inject_adapter_in_model

ADAPTER = "default"

# Suffixes of module names in diffusers' UNet2DConditionModel.
UNET_LINEAR = (
    r"attn[12]\.to_q", r"attn[12]\.to_k", r"attn[12]\.to_v", r"attn[12]\.to_out\.0",
    r"ff\.net\.0\.proj", r"ff\.net\.2", r"proj_in", r"proj_out",
    r"resnets\.\d+\.time_emb_proj", r"resnets\.\d+\.conv_shortcut",
)
UNET_CONV3X3 = (r"resnets\.\d+\.conv1", r"resnets\.\d+\.conv2", r"(down|up)samplers\.0\.conv")
TEXT_ENCODER = (r"self_attn\.(q_proj|k_proj|v_proj|out_proj)", r"mlp\.fc1", r"mlp\.fc2")


def _suffix_regex(suffixes) -> str:
    return r"^(.*\.)?(" + "|".join(suffixes) + r")$"


UNET_TARGETS = _suffix_regex(UNET_LINEAR + UNET_CONV3X3)
CONV_TARGETS = _suffix_regex(UNET_CONV3X3)
TEXT_TARGETS = _suffix_regex(TEXT_ENCODER)


def unet_lora_config(rank: int, alpha: float, conv_rank: int | None = None,
                     conv_alpha: float | None = None) -> LoraConfig:
    conv_rank = rank if conv_rank is None else conv_rank
    conv_alpha = alpha if conv_alpha is None else conv_alpha
    if conv_rank == 0:  # kohya's LoRA without conv_dim: linear layers and 1x1 convs only
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=_suffix_regex(UNET_LINEAR), init_lora_weights=True)
    pattern = r"(" + "|".join(UNET_CONV3X3) + r")"
    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS, init_lora_weights=True,
        rank_pattern={pattern: conv_rank}, alpha_pattern={pattern: conv_alpha},
    )


def text_encoder_lora_config(rank: int, alpha: float) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_TARGETS, init_lora_weights=True)


def add_lora(module: torch.nn.Module, config: LoraConfig, adapter: str = ADAPTER) -> list[torch.nn.Parameter]:
    """Inject a LoRA with peft; freeze the base; return the new trainable parameters
    (kept in float32 whatever the base dtype, so optimizer state and updates stay exact)."""
    module.requires_grad_(False)
    # peft directly rather than the models' add_adapter: transformers 5 refuses peft < 0.22.
    inject_adapter_in_model(config, module, adapter_name=adapter)
    params = []
    for name, p in module.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    return params


def lora_module_names(module: torch.nn.Module) -> list[str]:
    """Names of the modules that carry a LoRA (their base-layer names)."""
    return sorted({n.rsplit(".lora_A", 1)[0] for n, _ in module.named_modules() if n.endswith(".lora_A")})


def is_conv3x3_target(name: str) -> bool:
    return re.match(CONV_TARGETS, name) is not None
