"""EmoCats: Lion-like rule, one full-size state (spec 6)."""

from __future__ import annotations

import torch

from . import _native
from ._stats import count_below
from ._base import EmoOptimizer, StepScalars, masked_indices, on_accelerator, open_masks


def _decay(hp: StepScalars) -> float:
    # Decoupled decay divides by the constructor lr so the shrink follows the schedule.
    wd = hp.wd / hp.lr0 if hp.decoupled else hp.wd
    return hp.lr * wd


def emocats_update(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor,
                   hp: StepScalars) -> None:
    """The rule for one tensor, as optim/SPEC.md writes it."""
    mask = g.abs() >= hp.thr3  # |g| ** (1/3) >= thr
    # p * (1 - lr * wd_eff), written as p - (lr * wd_eff) p: the factor 1 - 1e-5 would be
    # rounded to float32 and bias every step by up to 6e-8 * p.
    p.add_(p, alpha=-_decay(hp))
    c = (exp_avg * hp.beta1).add_(g, alpha=1 - hp.beta1).sign_()
    p.add_(c * mask, alpha=-hp.step_size)
    exp_avg.mul_(hp.beta2).add_(g, alpha=1 - hp.beta2)  # after the update, as in Lion


def emocats_foreach(ps, gs, exp_avgs, hp: StepScalars) -> None:
    """Same rule on a list; closed filter entries zero the sign."""
    device = on_accelerator(ps[0].device)
    # CPU: mask only the rare tensors the filter closes in (emosens_foreach says why);
    # accelerator: a 0/1 factor on the device, no host round trip.
    closed = [] if device else masked_indices(gs, hp.thr3)
    # lerp: one pass instead of mul + add (differs from b1*m + (1-b1)*g only in rounding)
    c = torch._foreach_lerp(exp_avgs, gs, 1 - hp.beta1)  # the one parameter-sized temporary
    torch._foreach_sign_(c)
    for i in closed:
        c[i].masked_fill_(gs[i].abs() < hp.thr3, 0.0)
    decay = _decay(hp)
    if decay != 0:
        torch._foreach_add_(ps, ps, alpha=-decay)
    if device:
        torch._foreach_addcmul_(ps, c, open_masks(gs, hp.thr3), value=-hp.step_size)
    else:
        torch._foreach_add_(ps, c, alpha=-hp.step_size)
    torch._foreach_lerp_(exp_avgs, gs, 1 - hp.beta2)


# fused=True: the same rule in one pass per element (see _native.py).
_native.register("emocats", r"""
#define EMOCATS(T, S, ABS)                                                              \
void emocats_##S(int64_t n, const int64_t *P, const int64_t *G, const int64_t *M,       \
                 const int64_t *N, double decay, double step, double b1, double b2,      \
                 double thr3) {                                                          \
    const T tb1 = (T)b1, c1 = (T)(1.0 - b1), tb2 = (T)b2, c2 = (T)(1.0 - b2);           \
    const T tt = (T)thr3, ts = (T)step, td = (T)decay;                                   \
    for (int64_t k = 0; k < n; k++) {                                                    \
        T *restrict p = (T *)P[k], *restrict m = (T *)M[k];                              \
        const T *restrict g = (const T *)G[k];                                           \
        for (int64_t i = 0, len = N[k]; i < len; i++) {                                  \
            T gi = g[i], mi = m[i];                                                      \
            T x = tb1 * mi + c1 * gi;                                                    \
            T c = x > 0 ? (T)1 : (x < 0 ? (T)-1 : (T)0);                                 \
            c = ABS(gi) >= tt ? c : (T)0;                                                \
            p[i] = p[i] - td * p[i] - ts * c;                                            \
            m[i] = tb2 * mi + c2 * gi;                                                   \
        }                                                                                \
    }                                                                                    \
}
EMOCATS(float, f32, fabsf)
EMOCATS(double, f64, fabs)
""")


def emocats_fused(ps, gs, exp_avgs, hp: StepScalars) -> None:
    _native.launch("emocats", ps[0].dtype, [ps, gs, exp_avgs], [[p.numel() for p in ps]],
                   [_decay(hp), hp.step_size, hp.beta1, hp.beta2, hp.thr3])


class EmoCats(EmoOptimizer):
    """Lion-like member of the Emo family (see optim/SPEC.md, section 6)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.01, decoupled_weight_decay: bool = False,
                 use_shadow: bool = False, *, foreach: bool | None = None,
                 fused: bool = False, sync_loss: bool = True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, use_shadow=use_shadow)
        super().__init__(params, defaults, foreach=foreach, fused=fused, sync_loss=sync_loss)

    def _init_param_state(self, p, st):
        st["exp_avg"] = torch.zeros_like(p, dtype=self._state_dtype(p),
                                         memory_format=torch.preserve_format)

    def _held_back_count(self, g, hp):
        return count_below(g, hp.thr3)

    def _single(self, p, g, st, hp):
        emocats_update(p, g, st["exp_avg"], hp)

    def _foreach(self, ps, gs, ss, hp):
        emocats_foreach(ps, gs, [s["exp_avg"] for s in ss], hp)

    def _fused(self, ps, gs, ss, hp):
        m = [s["exp_avg"] for s in ss]
        if _native.eligible(ps, gs, m):
            emocats_fused(ps, gs, m, hp)
        else:
            emocats_foreach(ps, gs, m, hp)
