"""Watch work (validation, samples, logging) must not move the training's random streams:
a run with it on ends with the LoRA of the same run with it off, and resumes exactly."""

from __future__ import annotations

from contextlib import contextmanager

from ..disk.checkpoint import rng_state, set_rng_state


@contextmanager
def training_rng_untouched():
    """Put back the Python, NumPy, torch CPU and every CUDA device's RNG state
    afterwards. (The loop's own noise generator is never handed to watch code.)"""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
