"""EmoSens: Adam-like rule, two full-size states, no bias correction (spec 4)."""

from __future__ import annotations

import torch

from . import _native
from ._stats import count_below
from ._adamstyle import AdamStyleOptimizer
from ._base import StepScalars, masked_indices, on_accelerator, open_masks


def emosens_update(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor,
                   exp_avg_sq: torch.Tensor, hp: StepScalars) -> None:
    """The rule for one tensor, as optim/SPEC.md writes it."""
    exp_avg.mul_(hp.beta1).add_(g, alpha=1 - hp.beta1)
    exp_avg_sq.mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)
    u = exp_avg / (exp_avg_sq.sqrt() + hp.eps)
    u.mul_(g.abs() >= hp.thr3)  # |g| ** (1/3) >= thr
    if hp.wd != 0:
        p.add_(p, alpha=-hp.lr * hp.wd)  # decoupled, not scaled by 1 - |s|
    p.add_(u, alpha=-hp.step_size)


def emosens_foreach(ps, gs, exp_avgs, exp_avg_sqs, hp: StepScalars, strict_square: bool = False) -> None:
    """Same rule on a list; the filter is folded into the denominator (1/inf = 0).
    ``strict_square``: the filter of EmoAiry's vectors (g * g > thr ** 3), which otherwise
    share this rule (spec 5)."""
    device = on_accelerator(ps[0].device)
    # CPU: find the rare tensors the filter closes in and mask only those (one temporary
    # at a time). Accelerator: mask everything on the device rather than wait for the
    # answer on the host.
    closed = [] if device else masked_indices(gs, hp.thr3, strict_square)
    torch._foreach_lerp_(exp_avgs, gs, 1 - hp.beta1)
    torch._foreach_mul_(exp_avg_sqs, hp.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, gs, gs, value=1 - hp.beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)  # the one parameter-sized temporary
    torch._foreach_add_(denom, hp.eps)
    if device:
        torch._foreach_div_(denom, open_masks(gs, hp.thr3, strict_square))  # x / 0 = inf
    for i in closed:
        shut = gs[i] * gs[i] <= hp.thr3 if strict_square else gs[i].abs() < hp.thr3
        denom[i].masked_fill_(shut, float("inf"))
    if hp.wd != 0:
        torch._foreach_add_(ps, ps, alpha=-hp.lr * hp.wd)  # not * (1 - lr*wd): see emocats
    torch._foreach_addcdiv_(ps, exp_avgs, denom, value=-hp.step_size)


# fused=True: the same rule in one pass per element (see _native.py); EmoAiry's vectors
# use it with their own filter.
_native.register("emosens", r"""
#define ADAM_FILTERED(NAME, T, S, SQRT, PASSES)                                         \
void NAME##_##S(int64_t n, const int64_t *P, const int64_t *G, const int64_t *M,        \
                const int64_t *V, const int64_t *N, double lr_wd, double step,           \
                double b1, double b2, double eps, double thr3) {                         \
    const T c1 = (T)(1.0 - b1), tb2 = (T)b2, c2 = (T)(1.0 - b2), te = (T)eps;            \
    const T tt = (T)thr3, ts = (T)step, td = (T)lr_wd;                                   \
    for (int64_t k = 0; k < n; k++) {                                                    \
        T *restrict p = (T *)P[k], *restrict m = (T *)M[k], *restrict v = (T *)V[k];      \
        const T *restrict g = (const T *)G[k];                                           \
        for (int64_t i = 0, len = N[k]; i < len; i++) {                                  \
            T gi = g[i];                                                                 \
            T mi = m[i] + c1 * (gi - m[i]);                                              \
            T vi = v[i] * tb2 + c2 * gi * gi;                                            \
            T u = (PASSES) ? mi / (SQRT(vi) + te) : (T)0;                                \
            m[i] = mi;                                                                   \
            v[i] = vi;                                                                   \
            p[i] = p[i] - td * p[i] - ts * u;                                            \
        }                                                                                \
    }                                                                                    \
}
ADAM_FILTERED(emosens, float, f32, sqrtf, fabsf(gi) >= tt)
ADAM_FILTERED(emosens, double, f64, sqrt, fabs(gi) >= tt)
ADAM_FILTERED(emoairy_vec, float, f32, sqrtf, gi * gi > tt)
ADAM_FILTERED(emoairy_vec, double, f64, sqrt, gi * gi > tt)
""")



def emosens_fused(ps, gs, exp_avgs, exp_avg_sqs, hp: StepScalars) -> None:
    _native.launch("emosens", ps[0].dtype, [ps, gs, exp_avgs, exp_avg_sqs],
                   [[p.numel() for p in ps]],
                   [hp.lr * hp.wd, hp.step_size, hp.beta1, hp.beta2, hp.eps, hp.thr3])


class EmoSens(AdamStyleOptimizer):
    """Adam-like member of the Emo family (see optim/SPEC.md, section 4). Constructor,
    defaults and state (``exp_avg``, ``exp_avg_sq``): ``AdamStyleOptimizer``
    (optim/_adamstyle.py)."""

    def _held_back_count(self, g, hp):
        return count_below(g, hp.thr3)

    def _single(self, p, g, st, hp):
        emosens_update(p, g, st["exp_avg"], st["exp_avg_sq"], hp)

    def _foreach(self, ps, gs, ss, hp):
        emosens_foreach(ps, gs, [s["exp_avg"] for s in ss], [s["exp_avg_sq"] for s in ss], hp)

    def _fused(self, ps, gs, ss, hp):
        m, v = [s["exp_avg"] for s in ss], [s["exp_avg_sq"] for s in ss]
        if _native.eligible(ps, gs, m, v):
            emosens_fused(ps, gs, m, v, hp)
        else:
            emosens_foreach(ps, gs, m, v, hp)
