"""Training checkpoints: everything needed to continue a run bit for bit.

A checkpoint is a folder ``OUTPUT/checkpoints/step-NNNNNN/`` holding
- ``trainable.safetensors``: the LoRA parameters by name (exact fp32 values);
- ``training_state.pt``: optimizer, LR scheduler, GradScaler and RNG states, readable
  with ``torch.load(weights_only=True)`` (tensors, numbers and lists only);
- ``checkpoint.json``: step, data order position, the resolved config, versions.
It is written into a temporary folder and renamed into place, and ``checkpoint.json``
is written last, so a folder without it (or a temporary one) is never taken as latest.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from .atomic import atomic_path
from .errors import UserError
from .layout import CHECKPOINT_FILES, CHECKPOINT_JSON, STEP_NAME, TRAINABLE, TRAINING_STATE, RunFolder, step_name

# torch and numpy are imported where tensors are handled: finding and checking a
# checkpoint (--resume's first step) is plain file work and must answer fast.

FORMAT = 1


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


def save_checkpoint(folder: Path, *, step: int, named_params: dict, optimizer, lr_scheduler, scaler,
                    data_state: dict, noise_state, config: dict, info: dict,
                    keep: int | None = None) -> Path:
    """Write ``folder/step-NNNNNN`` atomically; then keep only the newest ``keep``."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / step_name(step)
    with atomic_path(final, directory=True) as tmp:  # re-saving a step (a resumed run) replaces it
        save_file({k: v.detach().cpu().contiguous() for k, v in named_params.items()}, tmp / TRAINABLE)
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "noise_generator": noise_state, "rng": rng_state()}, tmp / TRAINING_STATE)
        meta = {"format": FORMAT, "step": step, "data": data_state, "config": config, **info}
        (tmp / CHECKPOINT_JSON).write_text(json.dumps(meta, indent=2))
    if keep:
        for old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(path: Path) -> bool:
    if not all((path / f).is_file() for f in CHECKPOINT_FILES):
        return False
    try:
        return json.loads((path / CHECKPOINT_JSON).read_text()).get("format") == FORMAT
    except (ValueError, OSError):
        return False


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_NAME.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """``--resume`` takes a run's output folder (its latest checkpoint) or a checkpoint folder."""
    path = Path(path).expanduser()
    if is_complete(path):
        return path
    found = list_checkpoints(RunFolder(path).checkpoints) or list_checkpoints(path)
    if not found:
        raise UserError(f"no complete checkpoint in {path}: pass a run's output folder or a "
                        "checkpoints/step-NNNNNN folder (train with --save-every N to write them)")
    return found[-1]


def read_meta(path: Path) -> dict:
    return json.loads((path / CHECKPOINT_JSON).read_text())


def restore_checkpoint(path: Path, *, named_params: dict, optimizer, lr_scheduler, scaler,
                       noise_generator) -> dict:
    """Load a checkpoint into freshly built training objects; returns its metadata."""
    import torch
    from safetensors.torch import load_file

    meta = read_meta(path)
    weights = load_file(path / TRAINABLE)
    missing = sorted(set(named_params) ^ set(weights))
    if missing:
        raise UserError(f"checkpoint {path} does not match this model's LoRA (first differing key "
                        f"{missing[0]!r}): resume with the checkpoint's own config")
    with torch.no_grad():
        for name, p in named_params.items():
            p.copy_(weights[name])
    state = torch.load(path / TRAINING_STATE, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    noise_generator.set_state(state["noise_generator"])
    set_rng_state(state["rng"])
    return meta
