"""An independent, deliberately naive transcription of optim/SPEC.md.

It imports nothing from optim/: every formula is copied from SPEC.md, one tensor and one
element-wise expression at a time, so that the package's fast paths can be checked
against it. The tests in this file check the oracle itself against the numbers SPEC.md
quotes (section 11), so a mistake in the oracle cannot silently agree with the package.
"""

from __future__ import annotations

import math

import torch


class Oracle:
    """One optimizer of the family, on plain tensors. ``kind``: emosens | emoairy | emocats."""

    def __init__(self, kind, params, lr=1e-3, betas=None, eps=1e-8, weight_decay=0.01,
                 use_shadow=False, decoupled_weight_decay=False):
        self.kind = kind
        self.p = [t.detach().clone() for t in params]
        self.lr0 = lr
        self.betas = betas or ((0.9, 0.99) if kind == "emocats" else (0.9, 0.999))
        self.eps = eps
        self.wd = weight_decay
        self.use_shadow = use_shadow
        self.decoupled = decoupled_weight_decay
        self.st = [dict() for _ in params]
        self.short = None
        self.long = None
        self.s = 0.0
        self.hist = []
        self.should_stop = False
        self.ratios = []

    # spec 1 and 7
    def _emotion(self, L):
        if L is None:
            return self.s
        if self.short is None:
            self.short = L
            self.long = L
        self.short = 0.3 * L + 0.7 * self.short
        self.long = 0.01 * L + 0.99 * self.long
        self.s = math.tanh(5 * (self.short - self.long))
        self.hist.append(self.s)
        self.hist = self.hist[-32:]
        if len(self.hist) == 32:
            mean = sum(self.hist) / 32
            mean_abs = sum(abs(x) for x in self.hist) / 32
            var = sum((x - mean) ** 2 for x in self.hist) / 32
            if mean_abs < 0.05 and var < 0.005:
                self.should_stop = True
        return self.s

    # spec 2
    def _ratio(self, s):
        if not self.use_shadow:
            return 0.0
        a = abs(s)
        if a > 0.6:
            return 0.6 + (a - 0.6) / 0.4 * 0.4
        if a > 0.1:
            return 0.1 + (a - 0.1) / 0.5 * 0.5
        return 0.0

    def step(self, grads, loss=None, lr=None):
        lr = self.lr0 if lr is None else lr
        s = self._emotion(loss)
        ratio = self._ratio(s)
        self.ratios.append(ratio)
        thr = 1e-4 * (1 + abs(s))
        b1, b2 = self.betas
        for i, g in enumerate(grads):
            if g is None:
                continue
            p = self.p[i]
            st = self.st[i]
            g = g.to(p.dtype)
            if self.use_shadow and ratio > 0:
                if "shadow" not in st:
                    st["shadow"] = p.clone()
                else:
                    p = (1 - ratio) * p + ratio * st["shadow"]
                    st["shadow"] = st["shadow"] + 0.05 * (p - st["shadow"])
            p = getattr(self, "_" + self.kind)(p, g, st, lr, thr, abs(s), b1, b2)
            self.p[i] = p

    def _emosens(self, p, g, st, lr, thr, a, b1, b2):
        m = st.get("m", torch.zeros_like(p))
        v = st.get("v", torch.zeros_like(p))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = m / (torch.sqrt(v) + self.eps)
        mask = (torch.abs(g) ** (1 / 3) >= thr).to(p.dtype)
        if self.wd != 0:
            p = p - lr * self.wd * p
        p = p - lr * (1 - a) * u * mask
        st["m"], st["v"] = m, v
        return p

    def _emoairy(self, p, g, st, lr, thr, a, b1, b2):
        if g.dim() >= 2:
            dims = tuple(range(1, g.dim()))
            R = torch.mean(g * g, dim=dims, keepdim=True) + self.eps
            C = torch.mean(g * g, dim=0, keepdim=True) + self.eps
            mask = (R ** (1 / 3) > thr).to(p.dtype) * (C ** (1 / 3) > thr).to(p.dtype)
            r = st.get("r", torch.zeros_like(R))
            c = st.get("c", torch.zeros_like(C))
            r = b1 * r + (1 - b1) * torch.sqrt(R)
            c = b1 * c + (1 - b1) * torch.sqrt(C)
            u = g / (torch.sqrt(r * c) + self.eps) * mask
            st["r"], st["c"] = r, c
        else:
            m = st.get("m", torch.zeros_like(p))
            v = st.get("v", torch.zeros_like(p))
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            u = m / (torch.sqrt(v) + self.eps)
            mask = ((g * g) ** (1 / 3) > thr).to(p.dtype)
            u = u * mask
            st["m"], st["v"] = m, v
        p = p - lr * self.wd * p
        p = p - lr * (1 - a) * u
        return p

    def _emocats(self, p, g, st, lr, thr, a, b1, b2):
        m = st.get("m", torch.zeros_like(p))
        wd_eff = self.wd / self.lr0 if self.decoupled else self.wd
        mask = (torch.abs(g) ** (1 / 3) >= thr).to(p.dtype)
        # Exact product rounded once (a float32 factor 1 - lr*wd_eff would bias each step).
        p = (p.double() * (1 - lr * wd_eff)).to(p.dtype)
        c = torch.sign(b1 * m + (1 - b1) * g)
        p = p - lr * (1 - a) * c * mask
        m = b2 * m + (1 - b2) * g
        st["m"] = m
        return p


# ---- the oracle against the numbers optim/SPEC.md quotes (section 11) -------------

def _emosens_steps_constant_grad(n):
    o = Oracle("emosens", [torch.zeros(1, dtype=torch.float64)], lr=1.0, weight_decay=0.0)
    steps, prev = [], 0.0
    g = torch.ones(1, dtype=torch.float64)
    for _ in range(n):
        o.step([g], loss=1.0)
        cur = o.p[0].item()
        steps.append(prev - cur)
        prev = cur
    return steps


def test_oracle_emosens_step_sizes_match_spec_section_11():
    steps = _emosens_steps_constant_grad(1000)
    assert abs(steps[0] - 3.16) < 0.01
    peak = max(range(len(steps)), key=lambda i: steps[i])
    assert 9 <= peak + 1 <= 15 and abs(steps[peak] - 6.6) < 0.1
    assert abs(steps[999] - 1.26) < 0.01


def test_oracle_emoairy_vector_mask_matches_spec_section_11():
    # Freezes entries with |g| <= 1e-6 * (1 + |s|) ** 1.5; s = 0 here.
    o = Oracle("emoairy", [torch.zeros(2, dtype=torch.float64)], weight_decay=0.0)
    o.step([torch.tensor([0.99e-6, 1.01e-6], dtype=torch.float64)], loss=1.0)
    assert o.p[0][0].item() == 0.0 and o.p[0][1].item() != 0.0


def test_oracle_emocats_decoupled_decay_matches_spec_section_11():
    o = Oracle("emocats", [torch.ones(3, dtype=torch.float64)], decoupled_weight_decay=True)
    o.step([torch.zeros(3, dtype=torch.float64)], loss=1.0)  # zero grad: only the decay
    assert torch.allclose(o.p[0], torch.full((3,), 0.99, dtype=torch.float64))


def test_oracle_shadow_ratio_reduces_to_abs_s():
    o = Oracle("emosens", [torch.zeros(1)], use_shadow=True)
    for a in (0.05, 0.1, 0.1001, 0.3, 0.6, 0.61, 0.95):
        expect = a if a > 0.1 else 0.0
        assert abs(o._ratio(a) - expect) < 1e-12 and abs(o._ratio(-a) - expect) < 1e-12


def test_oracle_calm_signal_needs_32_steps():
    o = Oracle("emosens", [torch.zeros(1)])
    for i in range(31):
        o.step([torch.ones(1)], loss=1.0)
        assert not o.should_stop
    o.step([torch.ones(1)], loss=1.0)
    assert o.should_stop
