"""When validation and samples happen. Pure Python."""

from __future__ import annotations


def interval(value: int | None, cfg) -> int:
    """``--val-every``/``--sample-every``: the value given, else every checkpoint, else
    every 10% of the run. 0 means only at step 0 and the end."""
    if value is not None:
        return value
    return cfg.save_every or max(1, cfg.steps // 10)


def due(step: int, every: int, last: int) -> bool:
    """After step ``step`` (of ``last``): the end of the run, or a multiple of ``every``."""
    return step == last or (every > 0 and step % every == 0)
