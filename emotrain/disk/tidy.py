"""What an interrupted earlier attempt left in a run folder, removed when the next run
there starts (under the folder's lock, so nothing found is another run's work in
progress): the temporary files and checkpoint folders of saves that did not finish, and
folders set aside for deletion. Only those temporary names (atomic.py) are ever removed:
a checkpoint folder under its real name was complete when its save renamed it into
place, so one that now misses a file (removed by hand, a half-finished delete of an
older version) is kept, and named as unusable. Each can be hundreds of MB at SDXL size.
Pure Python.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .atomic import leftovers, remove_tree
from .layout import CHECKPOINT_FILES, RunFolder
from .verify import step_folders

UNUSED = "unused"  # step-NNNNNN.unused: a checkpoint a resumed run set aside instead of replacing


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _names(folder: RunFolder, paths: list) -> str:
    return ", ".join(folder.relative(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def clean_leftovers(output) -> str | None:
    """Remove the leftovers in ``output``; -> a one-line note of what went, or None."""
    folder = RunFolder(output)
    found = leftovers(folder.root) + leftovers(folder.checkpoints)
    if not found:
        return None
    size = sum(_size(p) for p in found)
    for path in found:
        if path.is_dir():
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)
            else:
                remove_tree(path)
        else:
            path.unlink(missing_ok=True)
    return f"removed what an interrupted earlier attempt left in {folder.root} ({size / 2**20:.1f} MiB): " \
           f"{_names(folder, found)}"


def incomplete_checkpoints(output) -> str | None:
    """A note naming the checkpoint folders of ``output`` that miss a file (kept), or None."""
    folder = RunFolder(output)
    found = [p for p in step_folders(folder.checkpoints) if not all((p / f).is_file() for f in CHECKPOINT_FILES)]
    if not found:
        return None
    return (f"note: kept {_names(folder, found)}, which cannot be used (a file is missing); delete "
            f"{'it' if len(found) == 1 else 'them'} if you do not need {'it' if len(found) == 1 else 'them'} "
            f"({sum(_size(p) for p in found) / 2**20:.1f} MiB)")


def set_aside(checkpoint: Path) -> Path:
    """Rename a checkpoint folder a resumed run would replace to ``step-NNNNNN.unused``
    (``.unused-2``, ... when taken): kept, out of every checkpoint listing. A run's file
    (run.json of a run that stopped early) is set aside the same way."""
    for n in range(1, 1000):
        aside = checkpoint.with_name(f"{checkpoint.name}.{UNUSED}" + ("" if n == 1 else f"-{n}"))
        if not aside.exists():
            os.rename(checkpoint, aside)
            return aside
    raise FileExistsError(aside)
