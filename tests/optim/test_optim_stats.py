"""``optimizer.stats``: what the last step did, read from the optimizer (the figures a
trainer logs): effective step size, shadow ratio, threshold and, when asked for, the
number of gradient elements the filter held back, against counts made by hand."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from emo_api_helpers import ALL, _loss, _params, _set_grads  # noqa: E402

from optim import EmoAiry, EmoCats, EmoSens  # noqa: E402


def _grads_with_tiny_entries(params):
    """Gradients of about 1 with a few entries far below and just around the filter's
    edges: |g| = 1e-13 (closes EmoSens/EmoCats: |g| < 1e-12) and |g| = 1e-7 (closes
    EmoAiry's vectors: g^2 <= 1e-12, but not the others)."""
    _set_grads(params, 0)
    vec, mat, conv = (p.grad for p in params)
    vec[0], vec[1], vec[2] = 1e-13, 1e-7, -1e-13
    mat[0, 0], mat[1, 2] = -1e-13, 1e-7
    conv[0, 0, 0, 0] = 1e-13


@pytest.mark.parametrize("cls,expected", [(EmoSens, 4), (EmoCats, 4), (EmoAiry, 3)])
def test_held_back_count_matches_a_hand_count(cls, expected):
    # EmoAiry: only its vector filter can close with the default eps (spec 11): entries
    # 1e-13, 1e-7 and -1e-13 of the vector; its matrices pass everything.
    params = _params()
    opt = cls(params, lr=1e-3)
    _grads_with_tiny_entries(params)
    opt.count_filter_next_step()
    opt.step(loss=1.0)
    st = opt.stats
    assert int(st.held_back) == expected
    assert st.elements == sum(p.numel() for p in params)
    assert st.held_back_fraction() == pytest.approx(expected / st.elements)
    # Asked for once: the next step does not count (and says so).
    _grads_with_tiny_entries(params)
    opt.step(loss=1.0)
    assert opt.stats.held_back is None and opt.stats.held_back_fraction() is None


def test_emoairy_factored_filter_count_with_zero_eps():
    # eps = 0: a zero row closes a whole row of the matrix (R_i = 0), a zero column
    # a whole column; element (i, j) passes only when both pass (spec 5).
    p = torch.nn.Parameter(torch.ones(4, 5))
    opt = EmoAiry([p], lr=1e-3, eps=0.0)
    p.grad = torch.ones(4, 5)
    p.grad[1] = 0.0
    p.grad[:, 3] = 0.0
    opt.count_filter_next_step()
    opt.step(loss=1.0)
    assert int(opt.stats.held_back) == 4 * 5 - 3 * 4  # 3 open rows x 4 open columns pass


@pytest.mark.parametrize("cls", ALL)
def test_counting_changes_nothing_and_the_scalars_are_the_steps(cls):
    a, b = _params(), _params()
    opt_a, opt_b = cls(a, lr=1e-2, use_shadow=True), cls(b, lr=1e-2, use_shadow=True)
    for t in range(6):
        for params, opt in ((a, opt_a), (b, opt_b)):
            _set_grads(params, t)
            if opt is opt_b:
                opt.count_filter_next_step()
            opt.step(loss=_loss(t))
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    st, e = opt_b.stats, opt_b.emotion
    assert (st.step, st.s, st.short, st.long) == (6, e.s, e.short, e.long)
    assert st.effective_lr == (pytest.approx(1e-2 * (1 - abs(e.s))),)
    assert st.filter_threshold == pytest.approx(1e-4 * (1 + abs(e.s)))
    # the shadow ratio of spec 2 (both active bands reduce to |s|)
    assert st.shadow_ratio == (pytest.approx(abs(e.s) if abs(e.s) > 0.1 else 0.0),)
    assert math.isclose(opt_a.stats.s, st.s)
