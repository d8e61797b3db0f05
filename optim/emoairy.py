"""EmoAiry: Adafactor-like rule, factored second moment, no first moment for matrices (spec 5)."""

from __future__ import annotations

import torch

from . import _native
from ._stats import count_factored, count_square_at_most
from ._adamstyle import AdamStyleOptimizer
from ._base import StepScalars, masked_indices, on_accelerator
from .emosens import emosens_foreach


def _factor_means(sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A conv weight (O, I, kh, kw) is factored as O x (I*kh*kw); keepdim shapes broadcast
    # against the gradient in its own layout (channels_last included).
    return sq.mean(dim=tuple(range(1, sq.dim())), keepdim=True), sq.mean(dim=0, keepdim=True)


def emoairy_update(p: torch.Tensor, g: torch.Tensor, st: dict, hp: StepScalars) -> None:
    """The rule for one tensor, as optim/SPEC.md writes it."""
    if g.dim() >= 2:
        R, C = _factor_means(g * g)
        R, C = R + hp.eps, C + hp.eps
        mask = (R > hp.thr3) & (C > hp.thr3)  # R ** (1/3) > thr and C ** (1/3) > thr
        r, c = st["exp_avg_r"], st["exp_avg_c"]
        r.mul_(hp.beta1).add_(R.sqrt(), alpha=1 - hp.beta1)  # b1, not b2, as published
        c.mul_(hp.beta1).add_(C.sqrt(), alpha=1 - hp.beta1)
        u = g / ((r * c).sqrt() + hp.eps) * mask
    else:
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.mul_(hp.beta1).add_(g, alpha=1 - hp.beta1)
        v.mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)
        u = m / (v.sqrt() + hp.eps) * (g * g > hp.thr3)  # strict, and on g squared
    p.add_(p, alpha=-hp.lr * hp.wd)  # always applied, even when wd == 0
    p.add_(u, alpha=-hp.step_size)


def _open_filter(x: torch.Tensor, thr3: float) -> torch.Tensor:
    # 1 where x ** (1/3) > thr, else +inf: multiplying a denominator by it zeroes the step.
    return torch.where(x > thr3, 1.0, float("inf"))


def _may_close(hp: StepScalars) -> bool:
    # R, C >= eps: with the usual eps > threshold ** 3 every filter is open (spec 11).
    return hp.eps <= hp.thr3 * (1 + 1e-6)


def emoairy_matrix_foreach(ps, gs, rows, cols, hp: StepScalars) -> None:
    if on_accelerator(ps[0].device):
        emoairy_matrix_stacked(ps, gs, rows, cols, hp)
        return
    sq = torch._foreach_mul(gs, gs)
    R, C = map(list, zip(*[_factor_means(x) for x in sq]))
    del sq
    torch._foreach_add_(R, hp.eps)
    torch._foreach_add_(C, hp.eps)
    closed = set()
    if _may_close(hp):
        closed = set(masked_indices(R, hp.thr3 * (1 + 1e-6))) | set(
            masked_indices(C, hp.thr3 * (1 + 1e-6)))
    gates = {i: (_open_filter(R[i], hp.thr3), _open_filter(C[i], hp.thr3)) for i in closed}
    torch._foreach_sqrt_(R)
    torch._foreach_sqrt_(C)
    torch._foreach_lerp_(rows, R, 1 - hp.beta1)
    torch._foreach_lerp_(cols, C, 1 - hp.beta1)
    # sqrt(r) * sqrt(c) instead of sqrt(r * c): the square root runs on the small factors.
    sr = list(torch._foreach_sqrt(rows))
    sc = list(torch._foreach_sqrt(cols))
    for i, (gr, gc) in gates.items():
        sr[i] = sr[i] * gr
        sc[i] = sc[i] * gc
    eps = torch.full((), hp.eps, dtype=gs[0].dtype, device=gs[0].device)
    denom = torch._foreach_addcmul([eps] * len(gs), sr, sc)  # the parameter-sized temporary
    if hp.wd != 0:
        torch._foreach_add_(ps, ps, alpha=-hp.lr * hp.wd)  # not * (1 - lr*wd): see emocats
    torch._foreach_addcdiv_(ps, gs, denom, value=-hp.step_size)


def emoairy_matrix_stacked(ps, gs, rows, cols, hp: StepScalars) -> None:
    """The accelerator form of the same rule: factor means and denominators are computed
    for all same-shape tensors at once (SDXL's 1,576 LoRA tensors come in under 30
    shapes), a few kernels per shape instead of several per tensor, no host round trip."""
    groups: dict[torch.Size, list[int]] = {}
    for i, g in enumerate(gs):
        groups.setdefault(g.shape, []).append(i)
    gate = _may_close(hp)
    R, C, gates = [None] * len(gs), [None] * len(gs), {}
    for shape, idx in groups.items():
        sq = torch.stack([gs[i] for i in idx])  # (n, d0, d1, ...)
        sq.mul_(sq)
        r = sq.mean(dim=tuple(range(2, sq.dim())), keepdim=True).add_(hp.eps)  # (n, d0, 1, ...)
        c = sq.mean(dim=1, keepdim=True).add_(hp.eps)  # (n, 1, d1, ...)
        del sq
        if gate:
            gates[shape] = (_open_filter(r, hp.thr3), _open_filter(c, hp.thr3))
        for i, a, b in zip(idx, r.sqrt_().unbind(0), c.sqrt_().unbind(0)):
            R[i], C[i] = a, b
    torch._foreach_lerp_(rows, R, 1 - hp.beta1)
    torch._foreach_lerp_(cols, C, 1 - hp.beta1)
    del R, C
    denom = [None] * len(gs)
    for shape, idx in groups.items():
        # sqrt(r) * sqrt(c) as on the CPU path
        sr = torch.stack([rows[i] for i in idx]).sqrt_()
        sc = torch.stack([cols[i] for i in idx]).sqrt_()
        if shape in gates:
            sr.mul_(gates[shape][0])
            sc.mul_(gates[shape][1])
        for i, d in zip(idx, sr.mul(sc).add_(hp.eps).unbind(0)):  # parameter-sized in all
            denom[i] = d
    if hp.wd != 0:
        torch._foreach_add_(ps, ps, alpha=-hp.lr * hp.wd)
    torch._foreach_addcdiv_(ps, gs, denom, value=-hp.step_size)


# fused=True: the same rule with one reduction pass and one update pass (see _native.py).
# A closed filter row/column gets an infinite factor, so its step is g / inf = 0.
_native.register("emoairy", r"""
#define EMOAIRY(T, S, SQRT)                                                             \
void emoairy_mat_##S(int64_t n, const int64_t *P, const int64_t *G, const int64_t *R,   \
                     const int64_t *C, const int64_t *N, const int64_t *D0,              \
                     double lr_wd, double step, double b1, double eps, double thr3) {    \
    const T tb1 = (T)b1, c1 = (T)(1.0 - b1), te = (T)eps;                                \
    const T tt = (T)thr3, ts = (T)step, td = (T)lr_wd;                                   \
    for (int64_t k = 0; k < n; k++) {                                                    \
        T *restrict p = (T *)P[k], *restrict r = (T *)R[k], *restrict c = (T *)C[k];      \
        const T *restrict g = (const T *)G[k];                                           \
        const int64_t rows = D0[k], cols = N[k] / D0[k];                                 \
        double *cs = calloc(cols, sizeof(double));                                       \
        T *sc = malloc(cols * sizeof(T)), *sr = malloc(rows * sizeof(T));                \
        for (int64_t i = 0; i < rows; i++) {                                             \
            const T *gr = g + i * cols;                                                  \
            double rs = 0;                                                               \
            for (int64_t j = 0; j < cols; j++) {                                         \
                double x = (double)(gr[j] * gr[j]);                                      \
                rs += x;                                                                 \
                cs[j] += x;                                                              \
            }                                                                            \
            T Ri = (T)(rs / cols) + te;                                                  \
            r[i] = tb1 * r[i] + c1 * SQRT(Ri);                                           \
            sr[i] = Ri > tt ? SQRT(r[i]) : (T)INFINITY;                                  \
        }                                                                                \
        for (int64_t j = 0; j < cols; j++) {                                             \
            T Cj = (T)(cs[j] / rows) + te;                                               \
            c[j] = tb1 * c[j] + c1 * SQRT(Cj);                                           \
            sc[j] = Cj > tt ? SQRT(c[j]) : (T)INFINITY;                                  \
        }                                                                                \
        for (int64_t i = 0; i < rows; i++) {                                             \
            T *pr = p + i * cols, si = sr[i];                                            \
            const T *gr = g + i * cols;                                                  \
            for (int64_t j = 0; j < cols; j++)                                           \
                pr[j] = pr[j] - td * pr[j] - ts * (gr[j] / (si * sc[j] + te));           \
        }                                                                                \
        free(cs);                                                                        \
        free(sc);                                                                        \
        free(sr);                                                                        \
    }                                                                                    \
}
EMOAIRY(float, f32, sqrtf)
EMOAIRY(double, f64, sqrt)
""")


class EmoAiry(AdamStyleOptimizer):
    """Adafactor-like member of the Emo family (see optim/SPEC.md, section 5). Constructor
    and defaults: EmoSens' (``AdamStyleOptimizer``, optim/_adamstyle.py), as is the state
    of vectors."""

    _stacks_by_shape = True

    def _init_param_state(self, p, st):
        if p.dim() < 2:
            super()._init_param_state(p, st)  # spec 5: EmoSens' m and v
            return
        dt = self._state_dtype(p)
        # Keepdim shapes: (d0, 1, ..., 1) and (1, d1, ..., dk), d0 + prod(rest) elements.
        st["exp_avg_r"] = torch.zeros((p.shape[0],) + (1,) * (p.dim() - 1), dtype=dt,
                                      device=p.device)
        st["exp_avg_c"] = torch.zeros((1,) + tuple(p.shape[1:]), dtype=dt, device=p.device)

    def _held_back_count(self, g, hp):
        if g.dim() >= 2:
            return count_factored(g, hp.eps, hp.thr3)
        return count_square_at_most(g, hp.thr3)

    def _single(self, p, g, st, hp):
        emoairy_update(p, g, st, hp)

    def _foreach(self, ps, gs, ss, hp, fused=False):
        mat = [i for i, p in enumerate(ps) if p.dim() >= 2]
        vec = [i for i, p in enumerate(ps) if p.dim() < 2]
        if mat:
            lists = ([ps[i] for i in mat], [gs[i] for i in mat],
                     [ss[i]["exp_avg_r"] for i in mat], [ss[i]["exp_avg_c"] for i in mat])
            if fused and _native.eligible(*lists):
                _native.launch("emoairy_mat", ps[0].dtype, list(lists),
                               [[p.numel() for p in lists[0]], [p.shape[0] for p in lists[0]]],
                               [hp.lr * hp.wd, hp.step_size, hp.beta1, hp.eps, hp.thr3])
            else:
                emoairy_matrix_foreach(*lists, hp)
        if vec:
            lists = ([ps[i] for i in vec], [gs[i] for i in vec],
                     [ss[i]["exp_avg"] for i in vec], [ss[i]["exp_avg_sq"] for i in vec])
            if fused and _native.eligible(*lists):
                _native.launch("emoairy_vec", ps[0].dtype, list(lists),
                               [[p.numel() for p in lists[0]]],
                               [hp.lr * hp.wd, hp.step_size, hp.beta1, hp.beta2, hp.eps,
                                hp.thr3])
            else:
                emosens_foreach(*lists, hp, strict_square=True)  # spec 5: EmoSens' m, v, own filter

    def _fused(self, ps, gs, ss, hp):
        self._foreach(ps, gs, ss, hp, fused=True)
