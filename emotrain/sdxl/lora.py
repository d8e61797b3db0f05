"""Which SDXL layers get a LoRA, and how peft puts it there.

Two target sets (``--targets``), in the terms of sd-scripts' ``networks.lora``:

- ``transformer``: sd-scripts' default LoRA (no ``conv_dim``): the linear layers of the
  UNet's transformer blocks: attention q/k/v/out, the feed-forward, proj_in/proj_out.
  On SDXL: 722 modules.
- ``full`` (emotrain's default): sd-scripts with ``conv_dim`` (LoCon): also the ResNet
  blocks (3x3 conv1/conv2, the time-embedding projection, the 1x1 shortcut) and the
  down/up-sampler convs. On SDXL: 788 modules. 3x3 convolutions take their own rank and
  alpha (``conv_rank``/``conv_alpha``); ``conv_rank = 0`` leaves just them out, so the
  ResNets' time-embedding projections (17) and 1x1 shortcuts (11) still train.

1x1 convolutions count as linear layers, as in sd-scripts.
"""

from __future__ import annotations

import re

from ..errors import UserError

ADAPTER = "default"

# Module-name suffixes in diffusers' UNet2DConditionModel.
TRANSFORMER_LINEAR = (r"attn[12]\.to_q", r"attn[12]\.to_k", r"attn[12]\.to_v", r"attn[12]\.to_out\.0",
                      r"ff\.net\.0\.proj", r"ff\.net\.2", r"proj_in", r"proj_out")
RESNET_LINEAR = (r"resnets\.\d+\.time_emb_proj", r"resnets\.\d+\.conv_shortcut")
UNET_LINEAR = TRANSFORMER_LINEAR + RESNET_LINEAR
UNET_CONV3X3 = (r"resnets\.\d+\.conv1", r"resnets\.\d+\.conv2", r"(down|up)samplers\.0\.conv")
TEXT_ENCODER = (r"self_attn\.(q_proj|k_proj|v_proj|out_proj)", r"mlp\.fc1", r"mlp\.fc2")

# LoRA module kinds, for the planner's breakdown of where the parameters sit.
LAYER_KINDS = (
    ("attention", r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    ("feed-forward", r"ff\.net\.(0\.proj|2)$"),
    ("transformer proj_in/out", r"(proj_in|proj_out)$"),
    ("resnet conv1/conv2", r"resnets\.\d+\.(conv1|conv2)$"),
    ("resnet shortcut + time_emb_proj", r"resnets\.\d+\.(conv_shortcut|time_emb_proj)$"),
    ("down/up-sampler conv", r"(down|up)samplers\.0\.conv$"),
    ("text encoders", r"^text_encoder"),
)
TRANSFORMER_KINDS = ("attention", "feed-forward", "transformer proj_in/out")


def _suffix_regex(suffixes) -> str:
    return r"^(.*\.)?(" + "|".join(suffixes) + r")$"


UNET_TARGETS = _suffix_regex(UNET_LINEAR + UNET_CONV3X3)
TRANSFORMER_TARGETS = _suffix_regex(TRANSFORMER_LINEAR)
CONV_TARGETS = _suffix_regex(UNET_CONV3X3)
TEXT_TARGETS = _suffix_regex(TEXT_ENCODER)


def unet_lora_config(rank: int, alpha: float, conv_rank: int | None = None, conv_alpha: float | None = None,
                     targets: str = "full"):
    from peft import LoraConfig

    if targets == "transformer":
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=TRANSFORMER_TARGETS, init_lora_weights=True)
    if targets != "full":
        raise UserError(f"LoRA targets must be 'full' or 'transformer', got {targets!r}")
    conv_rank = rank if conv_rank is None else conv_rank
    conv_alpha = alpha if conv_alpha is None else conv_alpha
    if conv_rank == 0:  # full minus the 3x3 convs
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=_suffix_regex(UNET_LINEAR), init_lora_weights=True)
    pattern = r"(" + "|".join(UNET_CONV3X3) + r")"
    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS, init_lora_weights=True,
        rank_pattern={pattern: conv_rank}, alpha_pattern={pattern: conv_alpha},
    )


def text_encoder_lora_config(rank: int, alpha: float):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_TARGETS, init_lora_weights=True)


def lora_config_for_run(cfg, component: str = "unet"):
    """The LoRA a training config asks for on ``component``."""
    if component == "unet":
        return unet_lora_config(cfg.rank, cfg.effective_alpha, cfg.effective_conv_rank, cfg.effective_conv_alpha,
                                cfg.targets)
    return text_encoder_lora_config(cfg.rank, cfg.effective_alpha)


def add_lora(module, config, adapter: str = ADAPTER) -> list:
    """Inject a LoRA with peft; freeze the base; return the new trainable parameters
    (kept in float32 whatever the base dtype, so optimizer state and updates stay exact)."""
    from peft import inject_adapter_in_model

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


def lora_module_names(module) -> list[str]:
    """Names of the modules that carry a LoRA (their base-layer names)."""
    return sorted({n.rsplit(".lora_A", 1)[0] for n, _ in module.named_modules() if n.endswith(".lora_A")})


def layer_kind(name: str) -> str:
    return next((kind for kind, pattern in LAYER_KINDS if re.search(pattern, name)), "other")


def is_conv3x3_target(name: str) -> bool:
    return re.match(CONV_TARGETS, name) is not None
