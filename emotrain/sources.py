"""What ``--model`` may name, checked without loading anything (no torch here): the
built-in ``tiny[:SEED]`` (``tiny-vpred[:SEED]``: its v-prediction, zero-terminal-SNR
variant), a diffusers folder, a single ``.safetensors`` file, or a hub
repo id. ``emotrain.sdxl.resolve_model`` turns an accepted name into a local path."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError

TINY = re.compile(r"^tiny(-vpred)?(:(.*))?$")
MAX_TINY_SEED = 2**32 - 1
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def tiny_seed(model: str) -> int | None:
    """The seed of ``tiny`` / ``tiny:SEED`` (or ``tiny-vpred``...); None for any other model."""
    match = TINY.match(model)
    if not match:
        return None
    seed = match.group(3)
    if seed is None:
        return 0
    if not seed.isdigit() or int(seed) > MAX_TINY_SEED:
        raise UserError(f"model {model!r}: the tiny model takes a seed from 0 to {MAX_TINY_SEED}, e.g. tiny:1")
    return int(seed)


def tiny_vpred(model: str) -> bool:
    """``tiny-vpred[:SEED]``: the tiny model as a v-prediction, zero-terminal-SNR checkpoint."""
    match = TINY.match(model)
    return bool(match and match.group(1))


def is_hub_id(model: str) -> bool:
    return bool(HUB_ID.match(model)) and not Path(model).expanduser().exists()


def model_name(model: str) -> str:
    """What a file a user may share says of ``--model``: ``tiny[:SEED]`` and a hub repo id
    as given, a local folder or file by its name only (its path may hold the user's name)."""
    if TINY.match(model) or is_hub_id(model):
        return model
    return Path(model).name or model


def check_model(model: str) -> None:
    """Refuse what cannot be a model, before anything is imported or loaded."""
    if tiny_seed(model) is not None:
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() or not (path / "unet").is_dir():
            raise UserError(f"model folder {path} is not a diffusers SDXL folder (no model_index.json or unet/): "
                            "pass a folder saved by save_pretrained, a .safetensors checkpoint, a hub id or 'tiny'")
        return
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise UserError(f"model file {path} does not exist: check the path")
        if path.suffix == ".ckpt":
            raise UserError(f"{path} is a pickle checkpoint, which emotrain never loads: convert it to .safetensors")
        return
    if path.exists():
        raise UserError(f"model {path} is neither a diffusers folder nor a .safetensors file: pass one of those, "
                        "a hub repo id or 'tiny'")
    if not is_hub_id(model):
        raise UserError(f"model {model!r} not found: pass a diffusers SDXL folder, a .safetensors file, "
                        "a hub repo id (owner/name) or 'tiny'")
