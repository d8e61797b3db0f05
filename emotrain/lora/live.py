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
from .kinds import ADAPTER, LORA, is_adapter_tensor, kind_of_layer
from .weights import LoraWeights


def adapter_layers(model: torch.nn.Module, component: str, adapter: str = ADAPTER) -> dict[str, torch.nn.Module]:
    """Canonical name -> the peft layer carrying ``adapter``."""
    return {sdxl.name_from_model(model, component, path): module for path, module in model.named_modules()
            if kind_of_layer(module, adapter) is not None}


def zero_start_parameters(modules) -> list[torch.nn.Parameter]:
    """The adapter weights of ``modules`` that a fresh adapter starts at zero."""
    return [p for m in modules for layer in m.modules() if LORA.is_layer(layer) for p in LORA.zero_start(layer)]


def frozen_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The base model's parameters and buffers, the adapter's left out."""
    return [t for n, t in (*module.named_parameters(), *module.named_buffers()) if not is_adapter_tensor(n)]


def lora_weights_from_model(unet, text_encoders=None, adapter: str = ADAPTER) -> LoraWeights:
    """The LoRA of a peft-injected UNet (and text encoders), copied out in float32."""
    modules = {}
    for component, model in sdxl.component_models((unet, text_encoders)).items():
        if model is None:
            continue
        for name, layer in adapter_layers(model, component, adapter).items():
            modules[f"{component}.{name}"] = kind_of_layer(layer, adapter).module_from_layer(layer, adapter)
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
            plan += _layer_plan(f"{component}.{name}", layers[name], m, adapter)
    with torch.no_grad():
        for param, value in plan:
            param.copy_(value.to(param.dtype))


def _layer_plan(full: str, layer, m, adapter: str) -> list:
    """(live tensor, file value) pairs for one layer; refuses another kind, shape or scale."""
    kind = kind_of_layer(layer, adapter)
    if kind.name != m.kind:
        raise UserError(f"{full}: the file's adapter is {m.kind}, the model's {kind.name}: build the adapter "
                        "with lora_config_for")
    live, wanted = kind.live_tensors(layer, adapter), m.tensors
    if set(live) != set(wanted) or any(live[r].numel() != wanted[r].numel() or
                                        (r != "dora_scale" and tuple(live[r].shape) != tuple(wanted[r].shape))
                                        for r in live):
        shapes = lambda t: ", ".join(f"{r} {tuple(v.shape)}" for r, v in sorted(t.items()))  # noqa: E731
        raise UserError(f"{full}: the file's {m.kind} has shapes {shapes(wanted)}, the model's {shapes(live)}: the file "
                        "was trained on another model or with another rank")
    if not math.isclose(kind.layer_scale(layer, adapter), m.scale, rel_tol=1e-5):
        raise UserError(f"{full}: the file's alpha/rank is {m.scale:g}, the model's adapter uses "
                        f"{kind.layer_scale(layer, adapter):g}: build the adapter with lora_config_for")
    return [(live[r], wanted[r].reshape(live[r].shape)) for r in live]
