"""Where a LoRA's modules live in an SDXL model.

Merging, loading and reading a LoRA out all start from the same question: which model is
the ``unet``/``text_encoder``/``text_encoder_2`` of a name, and which weight is the
module's. SDXL comes as our ``SDXL``, a diffusers pipeline (both with those attributes),
or a bare (unet, text encoders) pair, and a text encoder may be nested or flattened.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .keys import COMPONENTS, name_in_model


def component_models(model_or_parts) -> dict[str, torch.nn.Module | None]:
    """An SDXL (emotrain's or a pipeline) or a (unet, text_encoders) pair -> the model of
    each component, None for a component that was not given."""
    if hasattr(model_or_parts, "unet") and hasattr(model_or_parts, "text_encoder_2"):
        unet, tes = model_or_parts.unet, (model_or_parts.text_encoder, model_or_parts.text_encoder_2)
    else:
        unet, tes = model_or_parts
    tes = list(tes or ())
    tes += [None] * (2 - len(tes))
    return dict(zip(COMPONENTS, (unet, tes[0], tes[1])))


def base_weight(model: torch.nn.Module, component: str, name: str) -> torch.Tensor:
    """The weight a LoRA on module ``name`` changes (under peft's wrapper, if injected)."""
    try:
        module = model.get_submodule(name_in_model(model, component, name))
    except AttributeError:
        module = None
    # A peft-injected layer keeps the original in base_layer; the delta belongs there.
    module = getattr(module, "base_layer", module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise UserError(f"the LoRA has {component}.{name}, which this model does not have: "
                        "the LoRA was made for another model architecture")
    return weight
