"""The kohya/sd-scripts LoRA format, which ComfyUI, A1111/Forge and diffusers all load.

One key triple per module: ``<prefix><flattened name>.lora_down.weight``,
``.lora_up.weight`` and a scalar ``.alpha`` tensor (without it readers take alpha to be
the rank). The module names and the ``ss_*``/modelspec header entries that say which
model the LoRA is for come from ``emotrain.sdxl``; this module only knows the layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ... import sdxl
from ...errors import UserError
from . import common, header_passthrough
from ..kinds import LORA
from ..weights import LoraModule, LoraWeights

PARTS = LORA.kohya_parts  # file key suffix -> down, up or alpha
ROLE = {role: suffix for suffix, role in PARTS.items()}
LAYOUT_KEYS = ()  # its ss_* entries describe the training, and are recomputed on write


def detect(keys) -> bool:
    return all(k.startswith(tuple(sdxl.KOHYA_PREFIXES)) for k in keys)


def read(tensors: dict[str, torch.Tensor], header: dict[str, str], p: Path, unet_config=None) -> LoraWeights:
    """``unet_config`` fixes the UNet's module names (default: SDXL's)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        base, _, kind = key.partition(".")
        if kind not in PARTS:
            raise common.unsupported(p, key)
        groups.setdefault(base, {})[kind] = value
    modules = {}
    for base, parts in groups.items():
        if ROLE["down"] not in parts or ROLE["up"] not in parts:
            raise common.incomplete(p, base, f"{ROLE['down']} or {ROLE['up']}")
        try:
            name = sdxl.module_from_kohya(base, unet_config)
        except UserError as exc:
            raise UserError(f"LoRA file {p}: {exc}") from None
        down, up = parts[ROLE["down"]], parts[ROLE["up"]]
        common.check_pair(p, base, down, up)
        alpha = float(parts[ROLE["alpha"]].item()) if ROLE["alpha"] in parts else float(down.shape[0])
        modules[name] = LoraModule(down, up, alpha)
    return LoraWeights(modules, source_format="kohya")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def kohya_metadata(weights: LoraWeights) -> dict[str, str]:
    """The ss_*/modelspec header sd-scripts writes, describing what the file holds."""
    unet = weights.component(sdxl.UNET)
    # network_dim/alpha describe the UNet's linear layers (and 1x1 convs), as in sd-scripts;
    # a text-encoder-only file falls back to the text encoders'.
    linear = [m for m in unet.values() if not (m.is_conv and m.down.shape[-1] > 1)]
    linear = linear or [m for m in weights.modules.values() if not m.is_conv]
    conv = [m for m in unet.values() if m.is_conv and m.down.shape[-1] > 1]
    dim = common.mode([m.rank for m in linear], common.mode([m.rank for m in conv], 0))
    alpha = common.mode([m.alpha for m in linear if m.rank == dim], float(dim))
    args = {}
    if conv:
        args["conv_dim"] = str(common.mode([m.rank for m in conv]))
        args["conv_alpha"] = _fmt(common.mode([m.alpha for m in conv]))
    return {
        "ss_network_module": LORA.network_module,
        "ss_network_dim": str(dim),
        "ss_network_alpha": _fmt(alpha),
        "ss_network_args": json.dumps(args),
        "ss_network_train_unet_only": str(not any(c != sdxl.UNET for c in weights.components)),
        "ss_network_train_text_encoder_only": str(sdxl.UNET not in weights.components),
        "modelspec.sai_model_spec": "1.0.0",
        **sdxl.KOHYA_ARCHITECTURE,
    }


def write(path, weights: LoraWeights, metadata: dict | None = None, unet_config=None,
          dtype: torch.dtype | None = None) -> Path:
    """Write ``weights`` to the file ``path``. ``metadata`` entries override the computed
    ss_* ones; non-string values are JSON-encoded."""
    tensors = {}
    for full, m in weights.modules.items():
        base = sdxl.kohya_name(full, unet_config)
        tensors[f"{base}.{ROLE['down']}"], tensors[f"{base}.{ROLE['up']}"] = common.cast(m, dtype)
        tensors[f"{base}.{ROLE['alpha']}"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    header = {**common.stringify(header_passthrough(weights.metadata)), **kohya_metadata(weights),
              **common.stringify(metadata)}
    return common.atomic_save(tensors, header, Path(path))
