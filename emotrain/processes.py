"""Which process this is under ``accelerate launch`` (torchrun's environment), known
without importing torch: the command line uses it to let one process take the output
folder's lock, clean it and speak for all."""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    return rank() == 0


def is_local_main() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0
