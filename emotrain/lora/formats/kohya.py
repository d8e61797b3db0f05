"""The kohya/sd-scripts LoRA format, which ComfyUI, A1111/Forge and diffusers all load,
and LyCORIS' extension of it (LoHa, LoKr, DoRA), which ComfyUI, A1111/Forge and
sd-scripts (through LyCORIS) load.

Per module ``<prefix><flattened name>.<part>`` with the kind's parts (LoRA:
``lora_down.weight``, ``lora_up.weight``; DoRA: also ``dora_scale``; LoHa ``hada_w1_a``...;
LoKr ``lokr_w1``, ``lokr_w2_a``...; see ``kinds.py``) and a scalar ``.alpha`` tensor
(without it readers take alpha to be the rank). The module names and the
``ss_*``/modelspec header entries that say which model the LoRA is for come from
``emotrain.sdxl``; this module only knows the layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ... import sdxl
from ...errors import UserError
from . import common, header_passthrough
from ..kinds import KINDS, kind_of_file
from ..weights import LoraWeights

LAYOUT_KEYS = ()  # its ss_* entries describe the training, and are recomputed on write


def accepts(weights) -> bool:
    return True  # every kind has its kohya/LyCORIS keys


def detect(keys) -> bool:
    return all(k.startswith(tuple(sdxl.KOHYA_PREFIXES)) for k in keys)


def read(tensors: dict[str, torch.Tensor], header: dict[str, str], p: Path, unet_config=None) -> LoraWeights:
    """``unet_config`` fixes the UNet's module names (default: SDXL's)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        base, _, part = key.partition(".")
        groups.setdefault(base, {})[part] = value
    modules = {}
    for base, parts in groups.items():
        alpha = parts.pop("alpha", None)
        kind = kind_of_file(set(parts))
        if kind is None:
            if "lora_up.weight" in parts:
                raise common.incomplete(p, base, "lora_down.weight or lora_up.weight")
            raise common.unsupported(p, f"{base}.{next(iter(parts), 'alpha')}")
        try:
            name = sdxl.module_from_kohya(base, unet_config)
        except UserError as exc:
            raise UserError(f"LoRA file {p}: {exc}") from None
        modules[name] = kind.from_file(parts, None if alpha is None else float(alpha.item()), name, str(p))
    return LoraWeights(modules, source_format="kohya")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def kohya_metadata(weights: LoraWeights) -> dict[str, str]:
    """The ss_*/modelspec header sd-scripts writes, describing what the file holds."""
    unet = weights.component(sdxl.UNET)
    # network_dim/alpha describe the UNet's linear layers (and 1x1 convs), as in sd-scripts;
    # a text-encoder-only file falls back to the text encoders'.
    linear = [m for m in unet.values() if not m.is_conv3x3]
    linear = linear or [m for m in weights.modules.values() if not m.is_conv]
    conv = [m for m in unet.values() if m.is_conv3x3]
    # (LoKr modules whose factors are both full have no rank: 0, left out here)
    dim = common.mode([m.rank for m in linear if m.rank], common.mode([m.rank for m in conv if m.rank], 0))
    alpha = common.mode([m.alpha for m in linear if m.rank == dim], float(dim))
    kind = KINDS[common.mode([m.kind for m in weights.modules.values()], "lora")]
    args = kind.network_args(list(weights.modules.values()))
    if conv:
        args["conv_dim"] = str(common.mode([m.rank for m in conv if m.rank], dim))
        args["conv_alpha"] = _fmt(common.mode([m.alpha for m in conv]))
    return {
        "ss_network_module": kind.network_module,
        "ss_network_dim": str(dim),
        "ss_network_alpha": _fmt(alpha),
        "ss_network_args": json.dumps(args),
        "ss_network_train_unet_only": str(not any(c != sdxl.UNET for c in weights.components)),
        "ss_network_train_text_encoder_only": str(sdxl.UNET not in weights.components),
        "modelspec.sai_model_spec": "1.0.1",  # sd-scripts' (library/sai_model_spec.py)
        **sdxl.KOHYA_ARCHITECTURE,
    }


def write(path, weights: LoraWeights, metadata: dict | None = None, unet_config=None,
          dtype: torch.dtype | None = None) -> Path:
    """Write ``weights`` to the file ``path``. ``metadata`` entries override the computed
    ss_* ones; non-string values are JSON-encoded."""
    tensors = {}
    for full, m in weights.modules.items():
        base = sdxl.kohya_name(full, unet_config)
        for part, t in m.entry.file_tensors(m).items():
            tensors[f"{base}.{part}"] = t if dtype is None else t.to(dtype)
        tensors[f"{base}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    header = {**common.stringify(header_passthrough(weights.metadata)), **kohya_metadata(weights),
              **common.stringify(metadata)}
    header.setdefault("modelspec.title", Path(path).stem)  # the spec's one required name
    header.update(common.addnet_hashes(tensors, header))  # over what is written, as sd-scripts
    return common.atomic_save(tensors, header, Path(path))
