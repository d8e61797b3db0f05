"""Between ``LoraWeights`` and a peft-injected model: reading a LoRA out, and putting
one in with exactly the file's targets, ranks and alphas.

Continuing training from a file needs the model's LoRA to be the file's, not merely
similar: ``lora_config_for`` derives the peft config from the file, and
``load_into_model`` refuses any module, shape or scale that differs, both ways.
"""

from __future__ import annotations

import math
import re

import torch

from .. import sdxl
from ..errors import UserError
from .common import mode
from .weights import LoraModule, LoraWeights


def _lora_layers(model: torch.nn.Module, component: str, adapter: str) -> dict[str, torch.nn.Module]:
    """Canonical name -> peft LoRA layer carrying ``adapter``."""
    out = {}
    for path, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and adapter in lora_a:
            out[sdxl.name_from_model(model, component, path)] = module
    return out


def _layer_alpha(layer, adapter: str) -> float:
    r = layer.r[adapter]
    alpha = float(layer.lora_alpha[adapter])
    scaling = float(layer.scaling[adapter])
    # The effective scale is what the model computes; alpha is reported so alpha/rank equals it.
    return alpha if math.isclose(scaling, alpha / r, rel_tol=1e-6) else scaling * r


def lora_weights_from_model(unet, text_encoders=None, adapter: str = "default") -> LoraWeights:
    """The LoRA of a peft-injected UNet (and text encoders), copied out in float32."""
    modules = {}
    for component, model in sdxl.component_models((unet, text_encoders)).items():
        if model is None:
            continue
        for name, layer in _lora_layers(model, component, adapter).items():
            down = layer.lora_A[adapter].weight.detach().float().clone()
            up = layer.lora_B[adapter].weight.detach().float().clone()
            modules[f"{component}.{name}"] = LoraModule(down, up, _layer_alpha(layer, adapter))
    return LoraWeights(modules)


def peft_config_kwargs(modules: dict[str, LoraModule], component: str) -> dict:
    """LoraConfig arguments reproducing these modules exactly: the commonest rank and alpha
    as defaults, the rest as exact-name patterns."""
    r = mode([m.rank for m in modules.values()])
    alpha = mode([m.alpha for m in modules.values()])
    targets, rank_pattern, alpha_pattern = [], {}, {}
    for name, m in sorted(modules.items()):
        target = sdxl.peft_target(component, name)
        targets.append(target)
        if m.rank != r:
            rank_pattern[re.escape(target)] = m.rank
        if m.alpha != alpha:
            alpha_pattern[re.escape(target)] = m.alpha
    return {"r": r, "lora_alpha": alpha, "target_modules": targets, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern}


def lora_config_for(weights: LoraWeights, component: str = sdxl.UNET):
    """A peft LoraConfig that injects exactly the file's modules with its ranks and alphas
    (for continuing training from a file); None when the file has nothing for ``component``."""
    from peft import LoraConfig
    modules = weights.component(component)
    if not modules:
        return None
    return LoraConfig(init_lora_weights=True, **peft_config_kwargs(modules, component))


def load_into_model(unet, text_encoders, weights: LoraWeights, adapter: str = "default") -> None:
    """Copy ``weights`` into a model whose LoRA was injected with the same targets, ranks
    and alphas (see ``lora_config_for``). Every module must match both ways."""
    models = sdxl.component_models((unet, text_encoders))
    for component, model in models.items():
        wanted = weights.component(component)
        if model is None and wanted:
            raise UserError(f"the LoRA file has {component}.{min(wanted)} but no {component} "
                            "was given to load it into")
    plan = []
    for component, model in models.items():
        if model is None:
            continue
        wanted = weights.component(component)
        layers = _lora_layers(model, component, adapter)
        extra = sorted(set(wanted) - set(layers))
        if extra:
            raise UserError(f"the LoRA file's {component}.{extra[0]} has no LoRA layer in the model: the file "
                            "was trained for other targets or another model; build the LoRA with lora_config_for")
        missing = sorted(set(layers) - set(wanted))
        if missing:
            raise UserError(f"the model's LoRA layer {component}.{missing[0]} is not in the LoRA file: the file "
                            "was trained for other targets; build the LoRA with lora_config_for")
        for name, m in sorted(wanted.items()):
            layer = layers[name]
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            if tuple(a.shape) != tuple(m.down.shape) or tuple(b.shape) != tuple(m.up.shape):
                raise UserError(f"{component}.{name}: the file's LoRA has shapes {tuple(m.down.shape)}/"
                                f"{tuple(m.up.shape)}, the model's {tuple(a.shape)}/{tuple(b.shape)}: the file "
                                "was trained on another model or with another rank")
            if not math.isclose(float(layer.scaling[adapter]), m.scale, rel_tol=1e-5):
                raise UserError(f"{component}.{name}: the file's alpha/rank is {m.scale:g}, the model's LoRA uses "
                                f"{float(layer.scaling[adapter]):g}: build the LoRA with lora_config_for")
            plan.append((a, m.down))
            plan.append((b, m.up))
    with torch.no_grad():
        for param, value in plan:
            param.copy_(value.to(param.dtype))
