"""Every image (and mask file) of a run decoded once before any model loads, so a
truncated or otherwise undecodable file stops the run in one line at the data scan, not
after the model loaded and encoding began.

The files are decoded in parallel (Pillow decodes outside the GIL). Those that decoded
are remembered in the encoded-data cache folder (``decoded.json``: path -> size and
modification time), so a second start decodes only what is new or changed; without a
cache folder (``--no-disk-cache``) every start decodes everything.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..disk.atomic import write_text
from ..errors import UserError
from .images import _open

MEMORY = "decoded.json"
MAX_WORKERS = 16


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _problem(path: Path) -> str | None:
    """Why ``path`` cannot be decoded, or None."""
    try:
        with _open(path) as img:
            img.load()
    except UserError as exc:  # unreadable header, or over the decompression-bomb limit
        return str(exc)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or damaged pixel data
        return f"cannot read image {path} ({exc}): remove or replace the file"
    return None


def _read_memory(path: Path | None) -> dict:
    try:
        memory = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}  # none yet, or damaged: decode again
    return memory if isinstance(memory, dict) else {}


def check_decodable(files, cache: Path | None) -> None:
    """Decode every file not remembered as decoded at its size and time; the first that
    fails is one line (with the count of others), after all were tried."""
    memory_path = cache / MEMORY if cache is not None else None
    memory = _read_memory(memory_path)
    todo = {}
    for path in dict.fromkeys(Path(f) for f in files):
        key, stamp = str(path.resolve()), _stamp(path)
        if memory.get(key) != stamp:
            todo[key] = (path, stamp)
    if not todo:
        return
    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1, len(todo)))
    with ThreadPoolExecutor(workers) as pool:
        problems = list(pool.map(_problem, [path for path, _ in todo.values()]))
    bad = [p for p in problems if p is not None]
    for (key, (_, stamp)), problem in zip(todo.items(), problems):
        if problem is None:
            memory[key] = stamp
    if memory_path is not None:
        try:
            write_text(memory_path, json.dumps(memory))
        except (OSError, UserError):
            pass  # only a memory: the next start decodes again
    if bad:
        more = f" (and {len(bad) - 1} more file(s) that cannot be read)" if len(bad) > 1 else ""
        raise UserError(bad[0] + more)
