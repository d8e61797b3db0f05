"""Between ``LoraWeights`` and a model that carries an adapter: reading the weights out
(saving), and putting a file's weights in (continuing, checking a file against a model).

Continuing training from a file needs the model's adapter to be the file's, not merely
similar: ``inject.lora_config_for`` derives the peft config from the file, and
``load_into_model`` refuses any module, shape or scale that differs, both ways.
"""

from __future__ import annotations

import math

import torch

from .. import sdxl
from ..errors import UserError
from .kinds import ADAPTER, LORA
from .weights import LoraModule, LoraWeights


def adapter_layers(model: torch.nn.Module, component: str, adapter: str = ADAPTER) -> dict[str, torch.nn.Module]:
    """Canonical name -> the peft layer carrying ``adapter``."""
    return {sdxl.name_from_model(model, component, path): module for path, module in model.named_modules()
            if LORA.is_layer(module, adapter)}


def zero_start_parameters(modules) -> list[torch.nn.Parameter]:
    """The adapter weights of ``modules`` that a fresh adapter starts at zero."""
    return [p for m in modules for layer in m.modules() if LORA.is_layer(layer) for p in LORA.zero_start(layer)]


def frozen_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The base model's parameters and buffers, the adapter's left out."""
    return [t for n, t in (*module.named_parameters(), *module.named_buffers()) if not LORA.is_adapter_tensor(n)]


def lora_weights_from_model(unet, text_encoders=None, adapter: str = ADAPTER) -> LoraWeights:
    """The LoRA of a peft-injected UNet (and text encoders), copied out in float32."""
    modules = {}
    for component, model in sdxl.component_models((unet, text_encoders)).items():
        if model is None:
            continue
        for name, layer in adapter_layers(model, component, adapter).items():
            down, up = (w.detach().float().clone() for w in LORA.factors(layer, adapter))
            modules[f"{component}.{name}"] = LoraModule(down, up, LORA.layer_alpha(layer, adapter))
    return LoraWeights(modules)


def load_into_model(unet, text_encoders, weights: LoraWeights, adapter: str = ADAPTER) -> None:
    """Copy ``weights`` into a model whose LoRA was injected with the same targets, ranks
    and alphas (see ``inject.lora_config_for``). Every module must match both ways."""
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
        layers = adapter_layers(model, component, adapter)
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
            a, b = LORA.factors(layer, adapter)
            if tuple(a.shape) != tuple(m.down.shape) or tuple(b.shape) != tuple(m.up.shape):
                raise UserError(f"{component}.{name}: the file's LoRA has shapes {tuple(m.down.shape)}/"
                                f"{tuple(m.up.shape)}, the model's {tuple(a.shape)}/{tuple(b.shape)}: the file "
                                "was trained on another model or with another rank")
            if not math.isclose(LORA.layer_scale(layer, adapter), m.scale, rel_tol=1e-5):
                raise UserError(f"{component}.{name}: the file's alpha/rank is {m.scale:g}, the model's LoRA uses "
                                f"{LORA.layer_scale(layer, adapter):g}: build the LoRA with lora_config_for")
            plan.append((a, m.down))
            plan.append((b, m.up))
    with torch.no_grad():
        for param, value in plan:
            param.copy_(value.to(param.dtype))
