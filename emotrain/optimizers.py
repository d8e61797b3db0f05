"""The optimizer layer: the Emo family and the usual baselines, built by name."""

from __future__ import annotations

import ast
import importlib

from .errors import UserError

# The one list of optimizers emotrain knows by name, with the names tables print.
EMO = {"emosens": "EmoSens", "emoairy": "EmoAiry", "emocats": "EmoCats"}
BASELINES = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "adafactor": "Adafactor", "lion": "Lion"}
NAMES = tuple(EMO) + tuple(BASELINES)
DISPLAY = {**EMO, **BASELINES}


def parse_optim_args(items: list[str] | dict | None) -> dict:
    """``["betas=(0.9,0.99)", "use_shadow=True"]`` -> keyword arguments (Python literals;
    anything that is not a literal stays a string, as in sd-scripts)."""
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UserError(f"optimizer argument {item!r} is not key=value: write e.g. --optim-args betas=(0.9,0.99)")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def optimizer_class(name: str):
    if name in EMO:
        return getattr(importlib.import_module("optim"), EMO[name])
    if name == "adamw":
        import torch
        return torch.optim.AdamW
    if name == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit
    if name == "lion":
        import bitsandbytes as bnb
        return bnb.optim.Lion
    if name == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor
    module, _, cls = name.rpartition(".")
    if not module:
        raise UserError(f"unknown optimizer {name!r}: use one of {', '.join(NAMES)} or a dotted path package.module.Class")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"cannot import optimizer {name!r} ({exc}): check the dotted path and that its package is installed") from None


def build_optimizer(name: str, params, lr: float, shadow: bool = False, args: dict | None = None):
    cls = optimizer_class(name)
    kwargs = dict(args or {})
    if name in EMO:
        kwargs.setdefault("use_shadow", shadow)
    elif name == "adafactor":
        # A fixed learning rate, so --lr and the scheduler mean what they say.
        kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **kwargs}
    elif name == "lion":
        kwargs = {"optim_bits": 32, **kwargs}
    try:
        return cls(params, lr=lr, **kwargs)
    except TypeError as exc:
        raise UserError(f"optimizer {name!r} rejected its arguments ({exc}): fix --optim-args") from None


def takes_loss(optimizer) -> bool:
    """Whether the optimizer feeds the training loss into its own state (the Emo family)."""
    return hasattr(optimizer, "emotion")
