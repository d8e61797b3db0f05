"""All-or-nothing writes: build under a temporary name beside the target, then rename.

A crash (even ``kill -9``) leaves either the old target or the new one, never half of
one. Files get the permissions the umask gives any new file (safetensors and mkstemp
would leave 0600), and are on disk before the rename makes them visible.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


def _file_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _settle(path: Path) -> None:
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    mode = _file_mode()
    for f in files:
        f.chmod(mode)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


@contextmanager
def atomic_path(target, directory: bool = False, if_exists: str = "replace"):
    """Yield a temporary path beside ``target`` to write into (a fresh folder when
    ``directory``); on success it becomes ``target``. ``if_exists="keep"``: an existing
    target wins (a cache another process built meanwhile)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        _settle(tmp)
        if target.exists():
            if if_exists == "keep":
                return
            if target.is_dir():  # a rename cannot replace a folder
                shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
