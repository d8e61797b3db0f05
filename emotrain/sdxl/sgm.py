"""diffusers <-> SGM module names of the SDXL UNet.

Kohya files name UNet modules the way Stability's SGM code does, because sd-scripts
trains SDXL on that UNet and ComfyUI/A1111 expect those names. The block mapping is
derived from the UNet config, not tabulated, so any UNet with SDXL's block structure
(SDXL itself, the tiny model) maps correctly.
"""

from __future__ import annotations

import functools
import json

from ..errors import UserError

RESNET_TO_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
RESNET_FROM_SGM = {v: k for k, v in RESNET_TO_SGM.items()}
# Layers outside the block structure: never our targets, but other trainers' files have them.
UNET_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
                  "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _cfg(config, key, default=None):
    try:
        value = config[key]
    except (KeyError, TypeError):
        value = getattr(config, key, default)
    return default if value is None else value


def sdxl_unet_config() -> dict:
    from .meta import load_config
    return load_config("sdxl_unet")


def config_key(config=None) -> str:
    """A UNet config as canonical JSON (default: SDXL's), for caches keyed by architecture.
    The ``_``-entries (diffusers version, source path) say nothing about the layout."""
    if config is None:
        return _sdxl_key()
    items = config.items() if hasattr(config, "items") else vars(config).items()
    return json.dumps({k: v for k, v in items if not k.startswith("_")}, sort_keys=True, default=list)


@functools.lru_cache(maxsize=1)
def _sdxl_key() -> str:
    return config_key(sdxl_unet_config())


def sgm_block_table(config=None) -> list[tuple[str, str, str]]:
    """(diffusers prefix, SGM prefix, kind) for every block of a UNet with SGM's layout:
    kind is "resnet", "attention" or "module" (a sampler conv, mapped whole).

    SGM numbers input blocks from 1 (0 is conv_in): each down level has layers_per_block
    ResNet(+attention) blocks, then one downsampler block unless it is the last level.
    Output blocks count from 0, layers_per_block + 1 per level, and the level's upsampler
    sits in its last block after the ResNet (index 1) or the attention (index 2)."""
    return list(_block_table(config_key(config)))


@functools.lru_cache(maxsize=8)
def _block_table(key: str) -> tuple[tuple[str, str, str], ...]:
    config = json.loads(key)
    down_types = list(_cfg(config, "down_block_types"))
    up_types = list(_cfg(config, "up_block_types"))
    lpb = _cfg(config, "layers_per_block", 2)
    down_layers = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * len(down_types)
    up_layers = [n + 1 for n in reversed(down_layers)]
    table = []
    idx = 1
    for i, kind in enumerate(down_types):
        for j in range(down_layers[i]):
            table.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", "resnet"))
            if "CrossAttn" in kind:
                table.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", "attention"))
            idx += 1
        if i < len(down_types) - 1:
            table.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{idx}.0.op", "module"))
            idx += 1
    mid = _cfg(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid:
        table.append(("mid_block.resnets.0", "middle_block.0", "resnet"))
        if "CrossAttn" in mid:
            table.append(("mid_block.attentions.0", "middle_block.1", "attention"))
            table.append(("mid_block.resnets.1", "middle_block.2", "resnet"))
        else:
            table.append(("mid_block.resnets.1", "middle_block.1", "resnet"))
    idx = 0
    for i, kind in enumerate(up_types):
        attn = "CrossAttn" in kind
        for j in range(up_layers[i]):
            table.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", "resnet"))
            if attn:
                table.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", "attention"))
            if j == up_layers[i] - 1 and i < len(up_types) - 1:
                table.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{idx}.{2 if attn else 1}.conv",
                              "module"))
            idx += 1
    return tuple(table)


def _split_prefix(name: str, prefix: str) -> str | None:
    if name == prefix:
        return ""
    if name.startswith(prefix + "."):
        return name[len(prefix) + 1:]
    return None


def to_sgm(name: str, table) -> str | None:
    """diffusers name -> SGM name; None when the module has no place in SGM's layout."""
    if name in UNET_TOP_LEVEL:
        return UNET_TOP_LEVEL[name]
    for diff, sgm, kind in table:
        rest = _split_prefix(name, diff)
        if rest is None:
            continue
        if kind == "module":
            return None if rest else sgm
        if kind == "resnet":
            if rest not in RESNET_TO_SGM:
                return None
            rest = RESNET_TO_SGM[rest]
        return f"{sgm}.{rest}" if rest else sgm
    return None


def unet_name_to_sgm(name: str, table) -> str:
    sgm = to_sgm(name, table)
    if sgm is None:
        raise UserError(f"UNet module {name} has no place in the SGM layout kohya files use: "
                        "save in diffusers format, or pass the matching UNet config")
    return sgm


def unet_name_from_sgm(name: str, table) -> str | None:
    """SGM name -> diffusers name; None when it is not an SGM name at all."""
    for diff, sgm in UNET_TOP_LEVEL.items():
        if name == sgm:
            return diff
    best = None
    for diff, sgm, kind in table:
        rest = _split_prefix(name, sgm)
        if rest is not None and (best is None or len(sgm) > len(best[1])):
            best = (diff, sgm, kind, rest)
    if best is None:
        return None
    diff, _, kind, rest = best
    if kind == "module":
        return diff if not rest else None
    if kind == "resnet":
        rest = RESNET_FROM_SGM.get(rest)
        if rest is None:
            return None
    return f"{diff}.{rest}" if rest else diff
