"""All-or-nothing writes: build under a temporary name beside the target, then rename.

A crash (even ``kill -9``) leaves either the old target or the new one, never half of
one. Files get the permissions the umask gives any new file (safetensors and mkstemp
would leave 0600), and are on disk before the rename makes them visible.

The writer never removes what it did not make: a file target never replaces a folder, a
folder target never replaces a file, and a non-empty folder is replaced only when the
caller owns it (``replace_folder=True``: a run re-saving its own checkpoint), by renaming
the old one aside first. Temporary names (``.NAME.PID.HEX.tmp``) and set-aside names
(``.NAME.PID.HEX.trash``) are what ``leftovers`` recognises after a crash.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError

LEFTOVER = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.(tmp|trash)$")


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


def _beside(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}"


def remove_tree(path: Path) -> None:
    """Delete a folder by renaming it aside first: a crash midway leaves a ``.trash``
    folder (which ``leftovers`` finds), never a half-deleted one under its real name."""
    aside = _beside(path, "trash")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def leftovers(folder: Path) -> list[Path]:
    """Temporary and set-aside entries an interrupted write or delete left in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if LEFTOVER.match(p.name))


def check_writable(target: Path) -> None:
    """Refuse a target whose nearest existing folder cannot take a new file (read-only,
    another user's, /proc...): tried with a nameless temporary file, which leaves nothing."""
    folder = next((p for p in Path(target).absolute().parents if p.exists()), None)
    if folder is None or not folder.is_dir():
        return  # check_target says what is wrong
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"cannot write {target}: {folder} does not take new files ({exc.strerror}); pass a path "
                        "you can write to") from None


def check_target(target: Path, directory: bool) -> None:
    """Refuse a target that is the other kind of thing (a folder where a file goes, ...)."""
    if target.is_dir() and not directory:
        raise UserError(f"{target} is a folder, not a file: pass a file path, or remove the folder yourself")
    if target.exists() and not target.is_dir() and directory:
        raise UserError(f"{target} is a file, not a folder: pass a folder path, or remove the file yourself")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {target}: {parent} is a file, not a folder")
            break


@contextmanager
def atomic_path(target, directory: bool = False, if_exists: str = "replace", replace_folder: bool = False):
    """Yield a temporary path beside ``target`` to write into (a fresh folder when
    ``directory``); on success it becomes ``target``. ``if_exists="keep"``: an existing
    target wins (a cache another process built meanwhile). An existing file is replaced;
    an existing folder only when empty, or when ``replace_folder`` (the caller's own)."""
    target = Path(target)
    check_target(target, directory)
    tmp = _beside(target, "tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp.mkdir()
    except OSError as exc:  # read-only, full, not ours: one line, nothing half-made
        raise UserError(f"cannot write {target} ({exc.strerror}): pass a path you can write to") from None
    try:
        yield tmp
        _settle(tmp)
        if target.exists() and if_exists == "keep":
            return
        check_target(target, directory)  # it may have appeared meanwhile
        if target.is_dir() and replace_folder:
            aside = _beside(target, "trash")
            os.replace(target, aside)
            os.replace(tmp, target)
            shutil.rmtree(aside, ignore_errors=True)
            return
        try:
            os.replace(tmp, target)  # a rename replaces a file or an empty folder, nothing else
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise UserError(f"{target} already exists and is not empty: remove it or choose another "
                                "path") from None
            raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
