"""What EmoSens (spec 4) and EmoAiry (spec 5) share: the constructor and Adam's moments.

Both take Adam's keywords with the same defaults, fixed by the spec: ``lr=1e-3,
betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, use_shadow=False``, plus the keyword-only
``foreach``, ``fused`` and ``sync_loss`` that ``EmoOptimizer`` checks and stores. Both keep
``exp_avg`` (m) and ``exp_avg_sq`` (v), full size, in the state dtype (spec 8): EmoSens
for every parameter, EmoAiry for its vectors (its matrices override the layout). These
are written here once; a subclass adds its rule. EmoCats (spec 6) keeps its own
constructor: other betas and ``decoupled_weight_decay``.
"""

from __future__ import annotations

import torch

from ._base import EmoOptimizer


class AdamStyleOptimizer(EmoOptimizer):
    """Base class of EmoSens and EmoAiry: their common constructor and m, v state."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, use_shadow: bool = False, *,
                 foreach: bool | None = None, fused: bool = False, sync_loss: bool = True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        use_shadow=use_shadow)
        super().__init__(params, defaults, foreach=foreach, fused=fused, sync_loss=sync_loss)

    def _init_param_state(self, p, st):
        dt = self._state_dtype(p)
        st["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
