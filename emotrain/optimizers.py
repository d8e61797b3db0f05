"""The optimizer layer: the Emo family and the usual baselines, built by name."""

from __future__ import annotations

import ast
import importlib
import math

from .errors import UserError
from .quiet import allow_bitsandbytes

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
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            out[key.strip()] = value.strip()
        if not _finite(out[key.strip()]):
            raise UserError(f"optimizer argument {item!r} is not a finite number: write a finite value")
    return out


def _finite(value) -> bool:
    """No nan or inf anywhere in a literal (``1e400`` reads as inf)."""
    if isinstance(value, (list, tuple, set)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, complex):
        return math.isfinite(value.real) and math.isfinite(value.imag)
    return not isinstance(value, float) or math.isfinite(value)


def optimizer_class(name: str):
    if name in EMO:
        return getattr(importlib.import_module("optim"), EMO[name])
    if name == "adamw":
        import torch
        return torch.optim.AdamW
    if name in ("adamw8bit", "lion"):
        allow_bitsandbytes()
        try:
            import bitsandbytes as bnb
        except Exception as exc:  # missing, or its native library fails to load
            raise UserError(f"optimizer {name!r} needs bitsandbytes, which does not load ({type(exc).__name__}: "
                            f"{str(exc)[:100]}): install it (pip install bitsandbytes) or pick another --optim") from None
        return bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.Lion
    if name == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor
    module, _, cls = name.rpartition(".")
    if not module or not cls:
        raise UserError(f"unknown optimizer {name!r}: use one of {', '.join(NAMES)} or a dotted path package.module.Class")
    if module.split(".")[0] == "bitsandbytes":
        allow_bitsandbytes()
    try:
        found = getattr(importlib.import_module(module), cls)
    except Exception as exc:  # not found, or the module fails on import: either way not usable
        raise UserError(f"cannot import optimizer {name!r} ({type(exc).__name__}: {str(exc)[:100]}): check the dotted "
                        "path and that its package is installed") from None
    if not isinstance(found, type):
        raise UserError(f"{name!r} is not a class: pass an optimizer class as package.module.Class")
    return found


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
        optimizer = cls(params, lr=lr, **kwargs)
    except Exception as exc:  # TypeError for unknown keywords, ValueError for bad values, ...
        raise UserError(f"optimizer {name!r} rejected its arguments ({type(exc).__name__}: {_first_line(exc)}): "
                        "fix --optim-args") from None
    if not all(callable(getattr(optimizer, m, None)) for m in ("step", "zero_grad", "state_dict", "load_state_dict")):
        raise UserError(f"{name!r} is not an optimizer (no step/zero_grad/state_dict): pass a torch optimizer class")
    return optimizer


def check_optimizer(name: str, lr: float, shadow: bool = False, args: dict | None = None, device=None) -> None:
    """Build the optimizer on a small stand-in parameter and take one step, so a missing
    package, a wrong class or an argument it rejects (some only complain when stepping)
    is reported in one line before any model loads."""
    import torch

    param = torch.nn.Parameter(torch.zeros(64, 64, device=device))  # 4096 elements: bitsandbytes' 8-bit state applies
    optimizer = build_optimizer(name, [param], lr, shadow, args)
    param.grad = torch.full_like(param, 1e-3)
    try:
        if takes_loss(optimizer):
            optimizer.step(loss=1.0)
        else:
            optimizer.step()
    except Exception as exc:
        raise UserError(f"optimizer {name!r} failed a trial step with these arguments ({type(exc).__name__}: "
                        f"{_first_line(exc)}): fix --optim-args") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:160]


def takes_loss(optimizer) -> bool:
    """Whether the optimizer feeds the training loss into its own state (the Emo family)."""
    return hasattr(optimizer, "emotion")
