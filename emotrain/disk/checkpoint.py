"""Training checkpoints: everything needed to continue a run bit for bit.

A checkpoint is a folder ``OUTPUT/checkpoints/step-NNNNNN/`` holding
- ``trainable.safetensors``: the LoRA parameters by name (exact fp32 values);
- ``ema.safetensors`` (with --ema-decay only): the EMA of the LoRA by name (run/ema.py);
- ``training_state.pt``: optimizer, LR scheduler, GradScaler and RNG states, readable
  with ``torch.load(weights_only=True)`` (tensors, numbers and lists only);
- ``checkpoint.json``: step, data order position, the resolved config, versions, the
  loss history so far, and each file's size and sha256 (checked before use: verify.py).
It is written into a temporary folder and renamed into place, and ``checkpoint.json``
is written last, so a folder without it (or a temporary one) is never taken as latest.
Nothing non-finite is ever written: a state holding nan or inf is refused.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .atomic import atomic_path, remove_tree
from ..errors import NonFiniteState, UserError
from .layout import CHECKPOINT_FILES, CHECKPOINT_JSON, EMA, TRAINABLE, TRAINING_STATE, step_name
from .verify import CHECKPOINT_VERSIONS, file_record, read_meta, self_checksum, step_folders

# torch and numpy are imported where tensors are handled: finding and checking a
# checkpoint (--resume's first step) is plain file work and must answer fast.

VERSION = CHECKPOINT_VERSIONS[-1]  # 2: file sizes and sha256 recorded (verify.py)


def rng_state() -> dict:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": np_state[1].tolist(), "numpy_pos": int(np_state[2]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def non_finite(named_params: dict, optimizer_state: dict) -> str | None:
    """What holds nan or inf among the parameters and the optimizer state, or None."""
    import torch

    for name, p in named_params.items():
        if not bool(torch.isfinite(p.detach()).all()):
            return f"parameter {name}"
    for index, state in optimizer_state.get("state", {}).items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"optimizer state {key!r} of parameter {index}"
    return None


def save_checkpoint(folder: Path, *, step: int, named_params: dict, optimizer, lr_scheduler, scaler,
                    data_state: dict, noise_state, config: dict, info: dict,
                    keep: int | None = None, ema: dict | None = None) -> Path:
    """Write ``folder/step-NNNNNN`` atomically, with every file's size and sha256 and a
    checksum of checkpoint.json itself; then keep only the newest ``keep``. ``noise_state``
    is one generator state, or a list with one per process; ``ema``: the EMA's tensors by
    name (--ema-decay), or None."""
    import torch
    from safetensors.torch import save_file

    optimizer_state = optimizer.state_dict()
    bad = non_finite(named_params, optimizer_state)
    if bad:
        raise NonFiniteState(f"the training state became non-finite ({bad} holds nan or inf) by step {step}: "
                             "not saved")
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / step_name(step)
    noise_states = noise_state if isinstance(noise_state, list) else [noise_state]
    # re-saving a step (a resumed run passing it again) replaces this run's own folder
    with atomic_path(final, directory=True, replace_folder=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in named_params.items()}, tmp / TRAINABLE)
        if ema is not None:
            save_file(ema, tmp / EMA)
        torch.save({"optimizer": optimizer_state, "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "noise_generator": noise_states[0], "noise_generators": noise_states,
                    "rng": rng_state()}, tmp / TRAINING_STATE)
        meta = {"format": VERSION, "step": step, "data": data_state, "config": config, **info,
                "files": {name: file_record(tmp / name) for name in (TRAINABLE, TRAINING_STATE)
                          + ((EMA,) if ema is not None else ())}}
        meta["sha256"] = self_checksum(meta)
        (tmp / CHECKPOINT_JSON).write_text(json.dumps(meta, indent=2))
    if keep:
        for old in list_checkpoints(folder)[:-keep]:
            remove_tree(old)  # renamed aside first: a kill midway never leaves half a checkpoint
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in ``folder`` with all their files and a readable checkpoint.json,
    oldest first (not hashed: ``verify.problem`` does that before one is used)."""
    out = []
    for path in step_folders(folder):
        try:
            read_meta(path)
        except UserError:
            continue
        if all((path / f).is_file() for f in CHECKPOINT_FILES):
            out.append(path)
    return out


def restore_checkpoint(path: Path, *, named_params: dict, optimizer, lr_scheduler, scaler,
                       noise_generator, rank: int = 0, ema=None) -> dict:
    """Load a checkpoint into freshly built training objects; returns its metadata (with
    ``noise_restored``: whether this process's noise stream was in it). ``ema``: the run's
    EMA (run/ema.py), which the checkpoint must hold (refused in one line if it does not)."""
    import torch
    from safetensors.torch import load_file

    meta = read_meta(path)
    if ema is not None and not (path / EMA).is_file():
        raise UserError(f"checkpoint {path} holds no EMA of the LoRA (it was written without --ema-decay): resume "
                        "without --ema-decay, or start a new run with it")
    try:
        ema_tensors = load_file(path / EMA) if ema is not None else None
        weights = load_file(path / TRAINABLE)
        state = torch.load(path / TRAINING_STATE, weights_only=True, map_location="cpu")
    except Exception as exc:  # a damaged file that no checksum covered (a checkpoint of format 1)
        raise UserError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:100]}): "
                        "resume from an older checkpoint") from None
    missing = sorted(set(named_params) ^ set(weights))
    if missing:
        raise UserError(f"checkpoint {path} does not match this model's LoRA (first differing key "
                        f"{missing[0]!r}): resume with the checkpoint's own config")
    for name, p in named_params.items():
        if tuple(weights[name].shape) != tuple(p.shape):
            raise UserError(f"checkpoint {path}: {name} is {tuple(weights[name].shape)} in the file but "
                            f"{tuple(p.shape)} for its config (was checkpoint.json's rank edited?): resume with "
                            "the checkpoint's own config")
    with torch.no_grad():
        for name, p in named_params.items():
            p.copy_(weights[name])
    if ema is not None:
        ema.load_state_dict(ema_tensors, f"checkpoint {path}")
    try:
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise UserError(f"checkpoint {path}: its optimizer state does not fit this run ({str(exc)[:100]}): resume "
                        "with the checkpoint's own config") from None
    noise_states = state.get("noise_generators") or [state["noise_generator"]]
    meta["noise_restored"] = rank < len(noise_states) and noise_states[rank] is not None  # None: a lost process's
    if meta["noise_restored"]:
        noise_generator.set_state(noise_states[rank])
    set_rng_state(state["rng"])
    return meta
