"""Where emotrain keeps what it builds once and reuses: the tiny model, the demo images.
``EMOTRAIN_CACHE`` moves it; otherwise ``$XDG_CACHE_HOME/emotrain`` or ``~/.cache/emotrain``."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError


def cache_root() -> Path:
    root = os.environ.get("EMOTRAIN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emotrain"
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"the cache {root} is a file: set EMOTRAIN_CACHE to a folder")
    return root
