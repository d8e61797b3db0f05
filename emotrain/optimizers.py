"""The optimizer layer: the Emo family and the usual baselines, built by name."""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import math

from .errors import UserError
from .quiet import allow_bitsandbytes

# The one list of optimizers emotrain knows by name, with the names tables print.
EMO = {"emosens": "EmoSens", "emoairy": "EmoAiry", "emocats": "EmoCats"}
BASELINES = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "adafactor": "Adafactor", "lion": "Lion"}
# The optimizers users reach for when they do not want to tune a learning rate.
LR_FREE = {"prodigy": "Prodigy", "adamw-schedulefree": "AdamW schedule-free"}
NAMES = tuple(EMO) + tuple(BASELINES) + tuple(LR_FREE)
DISPLAY = {**EMO, **BASELINES, **LR_FREE}

# Prodigy at the settings SDXL LoRA users run it with (sd-scripts, OneTrainer, the
# diffusers examples); --optim-args overrides any of them.
PRODIGY_DEFAULTS = {"decouple": True, "use_bias_correction": True, "safeguard_warmup": True, "betas": (0.9, 0.99),
                    "weight_decay": 0.01, "d_coef": 1.0}
DEFAULT_LR = {"prodigy": 1.0}  # --lr when neither the preset nor the command line sets it
# Optimizers whose state size depends on the parameters' values (Prodigy keeps a
# 0-dim p0 for a parameter that starts at zero): the memory plan steps them on stand-ins.
VALUE_DEPENDENT_STATE = ("prodigy",)
TRAIN_POINT = "emotrain_train_point"  # a schedule-free checkpoint's training iterate, kept exactly


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
        if not _finite(out[key.strip()]) or str(out[key.strip()]).lower().lstrip("+-") in NON_FINITE_WORDS:
            raise UserError(f"optimizer argument {item!r} is not a finite number: write a finite value")
    return out


NON_FINITE_WORDS = ("nan", "inf", "infinity")  # not Python literals: they would pass on as strings


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
    if name in LR_FREE:
        package = {"prodigy": "prodigyopt", "adamw-schedulefree": "schedulefree"}[name]
        try:
            module = importlib.import_module(package)
        except Exception as exc:
            raise UserError(f"optimizer {name!r} needs the {package} package, which does not load ({type(exc).__name__}"
                            f"): install it (pip install {package}) or pick another --optim") from None
        return module.Prodigy if name == "prodigy" else module.AdamWScheduleFree
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


def optimizer_arguments(name: str, args: dict | None = None, shadow: bool = False, warmup_steps: int = 0) -> dict:
    """The keyword arguments ``name`` is built with: emotrain's defaults for it, then
    ``args`` (--optim-args) over them."""
    kwargs = dict(args or {})
    if name in EMO:
        kwargs.setdefault("use_shadow", shadow)
    elif name == "adafactor":
        # A fixed learning rate, so --lr and the scheduler mean what they say.
        kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **kwargs}
    elif name == "lion":
        kwargs = {"optim_bits": 32, **kwargs}
    elif name == "prodigy":
        kwargs = {**PRODIGY_DEFAULTS, **kwargs}
    elif name == "adamw-schedulefree":
        kwargs = {"warmup_steps": warmup_steps, **kwargs}  # its own warm-up replaces the schedule's
    return kwargs


def build_optimizer(name: str, params, lr: float, shadow: bool = False, args: dict | None = None,
                    warmup_steps: int = 0):
    """The optimizer ``name`` on ``params`` (tensors, or parameter groups as dicts), ready
    to step (a schedule-free one in train mode). ``warmup_steps``: the warm-up a
    schedule-free optimizer does itself (``lr_schedule``)."""
    cls = optimizer_class(name)
    kwargs = optimizer_arguments(name, args, shadow, warmup_steps)
    params = list(params)
    if params and isinstance(params[0], dict):
        problem = group_lr_problem(name, [g.get("lr", lr) for g in params])
        if problem:
            raise UserError(problem)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # prodigyopt prints "Using decoupled weight decay"
            optimizer = cls(params, lr=lr, **kwargs)
    except Exception as exc:  # TypeError for unknown keywords, ValueError for bad values, ...
        raise UserError(f"optimizer {name!r} rejected its arguments ({type(exc).__name__}: {_first_line(exc)}): "
                        "fix --optim-args") from None
    if not all(callable(getattr(optimizer, m, None)) for m in ("step", "zero_grad", "state_dict", "load_state_dict")):
        raise UserError(f"{name!r} is not an optimizer (no step/zero_grad/state_dict): pass a torch optimizer class")
    if is_schedule_free(optimizer):
        optimizer.train()  # it refuses to step otherwise; eval() only around evaluation (evaluation_point)
    return optimizer


def group_lr_problem(name: str, lrs: list[float]) -> str | None:
    """Prodigy adapts one step size d for all parameters and takes one lr: prodigyopt
    stops at its first step when parameter groups have different lrs (other than 0)."""
    distinct = sorted({float(lr) for lr in lrs if lr})
    if name == "prodigy" and len(distinct) > 1:
        return (f"prodigy adapts one step size for all parameters and takes one lr, but the parameter groups have "
                f"lrs {', '.join(f'{x:g}' for x in distinct)}: give every part the same lr, or use another --optim")
    return None


def lr_note(name: str, lr: float) -> str | None:
    """A one-line warning for an lr meant for another optimizer (``--optim prodigy --lr
    3e-4``); the run goes on."""
    if name == "prodigy" and max(lr, 1 / lr) >= 10:
        return (f"warning: --lr {lr:g} with prodigy: Prodigy finds its own step size and --lr scales it (1.0 is "
                f"usual; this is {max(lr, 1 / lr):.0f}x {'below' if lr < 1 else 'above'} it; an lr meant for AdamW?); "
                "the run goes on: pass --lr 1 (or drop it) unless you mean it")
    return None


def schedule_problem(name: str, lr_scheduler: str) -> str | None:
    if name == "adamw-schedulefree" and lr_scheduler not in ("constant", "constant_with_warmup"):
        return (f"adamw-schedulefree replaces the lr schedule (its average is the schedule), so --lr-scheduler "
                f"{lr_scheduler} would fight it: use --lr-scheduler constant (--warmup-steps sets its own warm-up)")
    return None


def lr_schedule(name: str, lr_scheduler: str, warmup_steps: int) -> tuple[str, int]:
    """(scheduler, warm-up steps) of the run's lr scheduler: a schedule-free optimizer
    warms up itself (``warmup_steps`` goes to it), and the scheduler stays constant."""
    return ("constant", 0) if name == "adamw-schedulefree" else (lr_scheduler, warmup_steps)


def is_schedule_free(optimizer) -> bool:
    """Whether ``optimizer`` evaluates at another point than it trains (the schedulefree
    package's optimizers: ``train()``/``eval()`` and a ``train_mode`` flag per group)."""
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None)) and \
        bool(getattr(optimizer, "param_groups", None)) and "train_mode" in optimizer.param_groups[0]


@contextlib.contextmanager
def evaluation_point(optimizer, keep_train_point: bool = False):
    """Inside: the parameters hold the weights a schedule-free optimizer evaluates (its
    averaged point x), as validation, samples, the saved LoRA and checkpoints must see
    them; on the way out the training iterate comes back bit for bit (kept aside, not
    recomputed), so evaluating never changes the training. ``keep_train_point``: the
    iterate is also in the optimizer's state meanwhile, for a checkpoint to hold
    (``restore_train_point`` takes it back). Other optimizers: nothing happens."""
    if not is_schedule_free(optimizer) or not optimizer.param_groups[0]["train_mode"]:
        yield
        return
    import torch

    params = [p for g in optimizer.param_groups for p in g["params"]]
    with torch.no_grad():
        kept = [p.detach().clone() for p in params]
    optimizer.eval()
    if keep_train_point:
        for p, y in zip(params, kept):
            optimizer.state[p][TRAIN_POINT] = y
    try:
        yield
    finally:
        with torch.no_grad():
            for p, y in zip(params, kept):
                p.copy_(y)
                optimizer.state[p].pop(TRAIN_POINT, None)
        for group in optimizer.param_groups:
            group["train_mode"] = True


def restore_train_point(optimizer) -> None:
    """After a checkpoint written inside ``evaluation_point(keep_train_point=True)`` is
    loaded: the parameters back at the training iterate it kept, in train mode."""
    if not is_schedule_free(optimizer):
        return
    import torch

    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                y = optimizer.state[p].pop(TRAIN_POINT, None)
                if y is not None:
                    p.copy_(y)
            group["train_mode"] = True


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
