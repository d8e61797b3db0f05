"""Which SDXL layers get an adapter, and what kind of layer each is.

Two target sets (``--targets``), in the terms of sd-scripts' ``networks.lora``:

- ``transformer``: sd-scripts' default LoRA (no ``conv_dim``): the linear layers of the
  UNet's transformer blocks: attention q/k/v/out, the feed-forward, proj_in/proj_out.
  On SDXL: 722 modules.
- ``full`` (emotrain's default): sd-scripts with ``conv_dim`` (LoCon): also the ResNet
  blocks (3x3 conv1/conv2, the time-embedding projection, the 1x1 shortcut) and the
  down/up-sampler convs. On SDXL: 788 modules. 3x3 convolutions take their own rank and
  alpha (``conv_rank``/``conv_alpha``); ``conv_rank = 0`` leaves just them out, so the
  ResNets' time-embedding projections (17) and 1x1 shortcuts (11) still train.

1x1 convolutions count as linear layers, as in sd-scripts. The text encoders' targets are
the attention projections and the MLP. Names are regular expressions over module names
in diffusers' UNet2DConditionModel and transformers' CLIP; how an adapter is put there is
``emotrain.lora``'s business. Pure Python.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UserError

TRANSFORMER_LINEAR = (r"attn[12]\.to_q", r"attn[12]\.to_k", r"attn[12]\.to_v", r"attn[12]\.to_out\.0",
                      r"ff\.net\.0\.proj", r"ff\.net\.2", r"proj_in", r"proj_out")
RESNET_LINEAR = (r"resnets\.\d+\.time_emb_proj", r"resnets\.\d+\.conv_shortcut")
UNET_LINEAR = TRANSFORMER_LINEAR + RESNET_LINEAR
UNET_CONV3X3 = (r"resnets\.\d+\.conv1", r"resnets\.\d+\.conv2", r"(down|up)samplers\.0\.conv")
TEXT_ENCODER_LINEAR = (r"self_attn\.(q_proj|k_proj|v_proj|out_proj)", r"mlp\.fc1", r"mlp\.fc2")

# Adapter module kinds, for the planner's breakdown of where the parameters sit.
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


def suffix_regex(suffixes) -> str:
    """A regex matching module names that end with one of ``suffixes`` at a dot boundary."""
    return r"^(.*\.)?(" + "|".join(suffixes) + r")$"


@dataclass(frozen=True)
class Targets:
    """The modules of one component that get an adapter: ``pattern`` matches them all;
    ``conv_pattern`` (a search pattern) picks the 3x3 convolutions among them, which take
    the conv rank and alpha; None when there are none."""
    pattern: str
    conv_pattern: str | None = None


TEXT_ENCODER_TARGETS = Targets(suffix_regex(TEXT_ENCODER_LINEAR))


def unet_targets(targets: str = "full", conv_rank: int | None = None) -> Targets:
    """The UNet's adapter targets for ``--targets`` (``conv_rank`` 0: no 3x3 convs)."""
    if targets == "transformer":
        return Targets(suffix_regex(TRANSFORMER_LINEAR))
    if targets != "full":
        raise UserError(f"LoRA targets must be 'full' or 'transformer', got {targets!r}")
    if conv_rank == 0:  # full minus the 3x3 convs
        return Targets(suffix_regex(UNET_LINEAR))
    return Targets(suffix_regex(UNET_LINEAR + UNET_CONV3X3), r"(" + "|".join(UNET_CONV3X3) + r")")


def layer_kind(name: str) -> str:
    return next((kind for kind, pattern in LAYER_KINDS if re.search(pattern, name)), "other")


_CONV3X3 = re.compile(r"(" + "|".join(UNET_CONV3X3) + r")$")
_CONV1X1 = re.compile(r"resnets\.\d+\.conv_shortcut$")


def weight_shape(name: str, out: int, flat_in: int) -> tuple[int, ...]:
    """The base weight's shape of an adapted module from its name and its flattened
    (out, in x kh x kw) size: what a LoHa/LoKr file's 2-D tensors leave open."""
    if _CONV3X3.search(name):
        return (out, flat_in // 9, 3, 3)
    if _CONV1X1.search(name):
        return (out, flat_in, 1, 1)
    return (out, flat_in)
