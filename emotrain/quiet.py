"""Third-party noise kept out of the user's terminal.

bitsandbytes is imported by diffusers and peft whenever it is installed, which costs
about 1.5 s on every command and, on machines without its CPU kernels, prints "Failed to
load CPU gemm_4bit_forward ..." warnings. The command line hides it (``import`` fails as
if it were not installed, which those libraries handle) until an 8-bit optimizer is
chosen: ``optimizers.py`` lets it back in then. Pure Python.
"""

from __future__ import annotations

import sys

HIDDEN = "bitsandbytes"


def hide_bitsandbytes() -> None:
    if HIDDEN not in sys.modules:
        sys.modules[HIDDEN] = None  # what Python itself uses to block an import


def allow_bitsandbytes() -> None:
    if HIDDEN in sys.modules and sys.modules[HIDDEN] is None:
        del sys.modules[HIDDEN]
