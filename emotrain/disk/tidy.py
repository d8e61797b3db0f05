"""What an interrupted earlier attempt left in a run folder, removed when the next run
there starts (under the folder's lock, so nothing found is another run's work in
progress): temporary files and checkpoint folders of saves that did not finish, folders
set aside for deletion, and checkpoint folders a kill left half-deleted (files missing).
Each can be hundreds of MB at SDXL size. Pure Python.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .atomic import leftovers, remove_tree
from .layout import CHECKPOINT_FILES, RunFolder
from .verify import step_folders


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def clean_leftovers(output) -> str | None:
    """Remove the leftovers in ``output``; -> a one-line note of what went, or None."""
    folder = RunFolder(output)
    found = leftovers(folder.root) + leftovers(folder.checkpoints)
    found += [p for p in step_folders(folder.checkpoints) if not all((p / f).is_file() for f in CHECKPOINT_FILES)]
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
    names = ", ".join(folder.relative(p) for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return f"removed what an interrupted earlier attempt left in {folder.root} ({size / 2**20:.1f} MiB): {names}"
