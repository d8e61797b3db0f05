"""Where the encoded-data cache lives, and whether it can: pure path work, checked with
the other options before anything loads."""

from __future__ import annotations

import os
from pathlib import Path

from ..disk.atomic import check_writable
from ..disk.cache import cache_root
from ..errors import UserError

DATA_CACHE = "data"  # under emotrain's cache folder


def cache_folder(cfg) -> Path | None:
    """--cache-dir, else ``data/`` in emotrain's cache (``EMOTRAIN_CACHE``); None with
    --no-disk-cache."""
    if not cfg.disk_cache:
        return None
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / DATA_CACHE


def check_folder(folder: Path) -> None:
    """A cache folder that is not a usable folder: one line."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"cache folder {folder}: {existing} is not a folder: pass another --cache-dir, "
                        "or --no-disk-cache")
    if existing is not None and not os.access(existing, os.R_OK | os.W_OK | os.X_OK):
        raise UserError(f"cache folder {existing} is not readable and writable: fix its permissions, pass "
                        "another --cache-dir, or --no-disk-cache")
    try:
        check_writable(folder / "probe")  # what permissions cannot tell (/proc, a read-only mount)
    except UserError as exc:
        raise UserError(f"cache folder: {exc}, another --cache-dir, or --no-disk-cache") from None
