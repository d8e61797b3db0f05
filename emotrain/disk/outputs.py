"""Where ``merge`` and ``convert`` may write, checked before anything is loaded.

An existing output of the other kind (a folder where a file goes, a file where a folder
goes) is refused; an existing file is replaced only with ``--overwrite``; a non-empty
folder is never replaced (it may hold a training run or a model). Pure Python.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import check_target, check_writable
from ..errors import UserError


def lora_output(path: str, file_name: str, overwrite: bool) -> Path:
    """The file a LoRA goes to: ``path`` itself when it ends in .safetensors, else
    ``path/file_name`` (a folder, as diffusers' load_lora_weights reads one)."""
    p = Path(path).expanduser()
    if not str(path).strip():
        raise UserError("the output path is empty: pass a .safetensors file or a folder")
    if p.suffix != ".safetensors":
        if p.exists() and not p.is_dir():
            raise UserError(f"{p} is a file and does not end in .safetensors: pass a .safetensors path, or a "
                            "folder to hold the LoRA")
        p = p / file_name
    check_target(p, directory=False)
    check_writable(p)
    if p.exists() and not overwrite:
        raise UserError(f"{p} already exists: pass --overwrite to replace it, or choose another path")
    return p


def model_output(path: str) -> Path:
    """A new folder for a merged model: absent or empty."""
    p = Path(path).expanduser()
    if not str(path).strip():
        raise UserError("the output path is empty: pass a folder for the merged model")
    check_target(p, directory=True)
    check_writable(p)
    if p.is_dir() and any(p.iterdir()):
        raise UserError(f"output folder {p} already exists and is not empty (--overwrite replaces files, never "
                        "folders): remove it or choose another folder")
    return p
