"""What the last step did, as the optimizer itself saw it (``optimizer.stats``).

Everything but the filter count is a Python float the step computes anyway. The filter
count needs a pass over the gradients, so it is made only when asked for
(``count_filter_next_step()``) and kept as a device tensor: reading it is the caller's
one host sync, at a moment the caller chooses (a logging step).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class StepStats(NamedTuple):
    step: int  # optimizer steps taken so far; these figures are the last one's
    s: float  # emotion scalar used by that step (spec 1)
    short: float | None
    long: float | None
    effective_lr: tuple  # per param group: lr * (1 - |s|), the step size of spec 3
    shadow_ratio: tuple  # per param group: the blend of spec 2 (0 with the shadow off)
    filter_threshold: float  # 1e-4 * (1 + |s|) (spec 3)
    held_back: torch.Tensor | None  # elements the filter zeroed on that step, when counted
    elements: int  # elements with a gradient on that step, when counted (else 0)

    def held_back_fraction(self) -> float | None:
        """Fraction of gradient elements the filter held back on the counted step
        (reads the count from the device)."""
        if self.held_back is None or not self.elements:
            return None
        return float(self.held_back) / self.elements


def count_below(g: torch.Tensor, limit: float) -> torch.Tensor:
    """Elements with |g| < limit: EmoSens' and EmoCats' closed filter entries (spec 4, 6)."""
    return torch.count_nonzero(g.abs() < limit)


def count_square_at_most(g: torch.Tensor, limit: float) -> torch.Tensor:
    """Elements with g * g <= limit: EmoAiry's closed vector entries (spec 5)."""
    return torch.count_nonzero(g * g <= limit)


def count_factored(g: torch.Tensor, eps: float, limit: float) -> torch.Tensor:
    """Elements EmoAiry's matrix filter closes (spec 5): element (i, j) passes only when
    its row mean R_i and column mean C_j both exceed the limit."""
    if eps > limit:  # R, C >= eps: the filter cannot close (spec 11)
        return torch.zeros((), dtype=torch.int64, device=g.device)
    sq = g * g
    rows = sq.mean(dim=tuple(range(1, g.dim()))) + eps
    cols = sq.reshape(g.shape[0], -1).mean(dim=0) + eps
    open_ = torch.count_nonzero(rows > limit) * torch.count_nonzero(cols > limit)
    return g.numel() - open_
