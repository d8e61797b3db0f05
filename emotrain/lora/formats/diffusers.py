"""The diffusers format: what ``pipe.load_lora_weights(folder)`` reads.

We write peft's own key layout (``unet.<module>.lora_A.weight``; DoRA also
``<module>.lora_magnitude_vector.weight``, peft's magnitude: (out,) for a linear layer,
(1, out, 1, 1) for a convolution; with the ``.weight`` the text encoders' loader,
transformers' ``load_adapter``, finds it too, without it that loader silently keeps the
magnitude's start) plus the LoraConfig arguments in the ``lora_adapter_metadata`` header
(``use_dora`` for DoRA): diffusers 0.42 converts older layouts
only when the first key needs it, which silently drops attention LoRAs in a mixed file,
and without the header it takes alpha to be the rank. We read that layout and the older
ones (``lora.down``, ``lora_linear_layer``, attention processors) too.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ... import sdxl
from ...errors import UserError
from . import common, header_passthrough
from ..inject import peft_config_kwargs
from ..kinds import KINDS, LORA
from ..weights import LoraModule, LoraWeights

METADATA_KEY = "lora_adapter_metadata"  # the header key diffusers reads LoraConfig arguments from
LAYOUT_KEYS = (METADATA_KEY,)

_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
    (".lora_magnitude_vector", "dora_scale"), (".lora_magnitude_vector.weight", "dora_scale"),
)


def accepts(weights: LoraWeights) -> bool:
    """diffusers' load_lora_weights loads LoRA and (through peft) DoRA; LoHa and LoKr it cannot."""
    return all(KINDS[k].diffusers_loads for k in weights.kinds)


def detect(keys) -> bool:
    return any(".lora_A." in k or ".lora.down." in k or "_lora.down." in k or ".lora_linear_layer." in k
               for k in keys)


def _module(key: str) -> tuple[str, str, str] | None:
    """-> (component, canonical module name, down/up/alpha)."""
    for suffix, kind in _SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        return None
    stem = stem.removeprefix("base_model.model.")
    component, _, name = stem.partition(".")
    if component not in sdxl.COMPONENTS:
        component, name = sdxl.UNET, stem  # bare UNet keys, as in a plain peft save of the UNet
    if suffix.startswith("_lora."):
        head, _, processor = name.rpartition(".")
        module = sdxl.processor_module(component, processor)
        if module is None:
            return None
        name = f"{head.removesuffix('.processor')}.{module}"
    return component, sdxl.canonical_name(component, name), kind


def _pattern_value(patterns: dict, name: str):
    # peft's own rule: a pattern matches a module whose name ends with it, at a dot boundary.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def read(tensors: dict[str, torch.Tensor], header: dict[str, str], p: Path, unet_config=None) -> LoraWeights:
    adapter_meta = header.get(METADATA_KEY)
    try:
        config = json.loads(adapter_meta) if adapter_meta else {}
    except json.JSONDecodeError:
        raise UserError(f"LoRA file {p} has a damaged {METADATA_KEY} header: re-save the file") from None
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        parsed = _module(key)
        if parsed is None:
            if "dora" in key or "lokr" in key or "hada" in key:
                raise common.unsupported(p, key)
            raise UserError(f"LoRA file {p} has an unknown key {key!r}: it is not a LoRA emotrain can read")
        component, name, kind = parsed
        groups.setdefault((component, name), {})[kind] = value
    modules = {}
    for (component, name), parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise common.incomplete(p, f"{component}.{name}")
        down, up = parts["down"], parts["up"]
        common.check_pair(p, f"{component}.{name}", down, up)
        alpha = _alpha(parts, config, component, name, down.shape[0])
        if "dora_scale" in parts:
            modules[f"{component}.{name}"] = KINDS["dora"].module(parts, alpha)
        else:
            modules[f"{component}.{name}"] = LoraModule(down, up, alpha)
    return LoraWeights(modules, source_format="diffusers")


def _alpha(parts: dict, config: dict, component: str, name: str, rank: int) -> float:
    if "alpha" in parts:
        return float(parts["alpha"].item())
    if f"{component}.r" not in config:
        return float(rank)  # what diffusers assumes for a file without alphas
    alpha = _pattern_value(config.get(f"{component}.alpha_pattern") or {}, name)
    if alpha is None:
        alpha = config.get(f"{component}.lora_alpha", config[f"{component}.r"])
    alpha = float(alpha)
    if config.get(f"{component}.use_rslora"):
        alpha = alpha * rank / math.sqrt(rank)  # scale alpha/sqrt(r) as alpha'/r
    return alpha


def write(path, weights: LoraWeights, metadata: dict | None = None, unet_config=None,
          dtype: torch.dtype | None = None) -> Path:
    """Write ``weights`` to the file ``path``, loadable whole by
    ``StableDiffusionXLPipeline.load_lora_weights``."""
    if not accepts(weights):
        raise UserError(f"diffusers' load_lora_weights cannot load {'/'.join(weights.kinds)} adapters: keep the "
                        "kohya/LyCORIS file (ComfyUI, A1111/Forge and sd-scripts load it), or merge it into a model")
    tensors, adapter_meta = {}, {}
    for component in weights.components:
        modules = weights.component(component)
        for name, m in modules.items():
            down, up = common.cast(m, dtype)
            for suffix, role in LORA.diffusers_parts.items():
                tensors[f"{component}.{name}.{suffix}"] = down if role == "down" else up
            if m.kind == "dora":  # peft's magnitude: (out,) for a linear layer, (1, out, 1, 1) for a conv
                mag = m.extra["dora_scale"].flatten()
                mag = mag.reshape(1, -1, 1, 1) if down.ndim == 4 else mag
                tensors[f"{component}.{name}.lora_magnitude_vector.weight"] = mag if dtype is None else mag.to(dtype)
        for k, v in peft_config_kwargs(modules, component).items():
            adapter_meta[f"{component}.{k}"] = v
    header = {**common.stringify(header_passthrough(weights.metadata)), **common.stringify(metadata), "format": "pt",
              METADATA_KEY: json.dumps(adapter_meta, sort_keys=True)}
    return common.atomic_save(tensors, header, Path(path))
