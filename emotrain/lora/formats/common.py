"""What every LoRA format shares: reading safetensors, writing them all-or-nothing, the
header's free-form entries, and the checks and refusals a reader makes.

Only safetensors are read or written: pickle formats can run code on load.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ...disk.atomic import atomic_path
from ...errors import UserError


def read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # truncated, not safetensors at all, bad header: all one problem for the user
        raise UserError(f"LoRA file {p} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}): "
                        "it is corrupt or not a safetensors file; re-save or re-download it") from None
    return tensors, header


def atomic_save(tensors: dict[str, torch.Tensor], header: dict[str, str], path: Path) -> Path:
    from safetensors.torch import save_file
    if not tensors:
        raise UserError("there are no LoRA modules to save: the LoRA is empty")
    bad = first_non_finite(tensors)
    if bad:  # a LoRA file of nan/inf would load anywhere and ruin every image
        raise UserError(f"not writing {path}: {bad} holds nan or inf values (the inputs or their weights "
                        "are too large or damaged)")
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
    return path


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first floating-point tensor's name that holds nan or inf, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def stringify(metadata: dict | None) -> dict[str, str]:
    """A safetensors header holds strings only: anything else goes in as JSON."""
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}


def cast(m, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    return (m.down, m.up) if dtype is None else (m.down.to(dtype), m.up.to(dtype))


def mode(values, default=None):
    """The commonest value: what a header's single rank/alpha field describes best."""
    return Counter(values).most_common(1)[0][0] if values else default


def check_pair(p, name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        raise UserError(f"LoRA file {p}: {name} has mismatched shapes down {tuple(down.shape)} / "
                        f"up {tuple(up.shape)}: the file is damaged")


def incomplete(p, name: str, parts: str = "down or up") -> UserError:
    return UserError(f"LoRA file {p} is incomplete: {name} lacks its {parts} weight; re-save or re-download it")


def unsupported(p, key: str) -> UserError:
    return UserError(f"LoRA file {p} is not a plain LoRA (key {key!r} belongs to LyCORIS/DoRA or another "
                     "network type): only LoRA/LoCon files are supported")


def addnet_hashes(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` and ``sshs_legacy_hash`` as sd-scripts computes them
    (library/train_util.py, ``precalculate_safetensors_hashes``) for sd-webui-additional-
    networks and A1111: the tensors serialized with the ``ss_*`` header entries alone;
    the model hash is the sha256 of what follows the header (the tensor data), the legacy
    one the first 8 hex digits of the sha256 of the 0x10000 bytes at offset 0x100000
    (of nothing, for a file shorter than that)."""
    import hashlib

    from safetensors.torch import save

    data = save({k: v.detach().contiguous() for k, v in tensors.items()},
                {k: v for k, v in header.items() if k.startswith("ss_")})
    start = 8 + int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[start:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}
