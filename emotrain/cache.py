"""Where emotrain keeps what it builds once and reuses: the tiny model, the demo images.
``EMOTRAIN_CACHE`` moves it; otherwise ``$XDG_CACHE_HOME/emotrain`` or ``~/.cache/emotrain``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("EMOTRAIN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emotrain"
    return Path(root)
