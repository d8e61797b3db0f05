"""Shared by the optimizer API tests: the optimizers, small parameters, gradients, losses."""

from __future__ import annotations

import torch

from optim import EmoAiry, EmoCats, EmoSens

ALL = [EmoSens, EmoAiry, EmoCats]
KIND = {EmoSens: "emosens", EmoAiry: "emoairy", EmoCats: "emocats"}
SHAPES = [(7,), (6, 5), (4, 3, 3, 3)]


def _params(seed=0, dtype=torch.float32, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _set_grads(params, step, seed=100):
    gen = torch.Generator().manual_seed(seed + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)


def _loss(step):
    return 1.0 / (1 + 0.2 * step) + (0.3 if step % 9 == 4 else 0.0)
