"""Step orchestration shared by EmoSens, EmoAiry and EmoCats.

The subclasses only provide their update rule (``_single``: one tensor, ``_foreach``: a
list of same-device/same-dtype tensors, ``_fused``: optional flat kernel) and their state
layout (``_init_param_state``). Everything else (loss intake, shadow-system, precision,
bucketing, checkpoints, the VRAM planner hook) lives here once.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import _native
from ._emotion import (EmotionState, Emotion, filter_threshold, loss_to_float,
                       shadow_blend_, shadow_ratio)
from ._stats import StepStats

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Foreach lists are processed in chunks of about this many elements. On the CPU a chunk
# stays cache-resident across the several passes of an update. On an accelerator every
# foreach call costs host time per kernel launch, so chunks are far larger there; they
# only bound the step's temporaries (two chunk-sized fp32 buffers, 128 MiB).
CHUNK_NUMEL = 1 << 16
DEVICE_CHUNK_NUMEL = 1 << 24
# Tests set this to run the accelerator code paths on CPU tensors against the oracle.
_DEVICE_PATH_ON_CPU = False
EMOTION_KEY = "emotion"  # reserved top-level key of state_dict()


def on_accelerator(device: torch.device) -> bool:
    """Whether the foreach paths take their accelerator form on ``device``: no per-tensor
    Python work, no host round trips (the filter stays on the device), EmoAiry's factored
    tensors reduced in same-shape stacks. CUDA steps were host-bound, launches dominating."""
    return device.type != "cpu" or _DEVICE_PATH_ON_CPU


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """Optimizer-state dtype for a parameter: float32 for fp16/bf16 (spec 8)."""
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


@dataclass(frozen=True)
class StepScalars:
    """Per-group, per-step scalars every rule needs."""

    lr: float        # current lr (after any scheduler)
    step_size: float  # lr * (1 - |s|)
    wd: float
    beta1: float
    beta2: float
    eps: float
    thr: float       # filter threshold 1e-4 * (1 + |s|)
    thr3: float      # thr ** 3: |g| ** (1/3) >= thr  <=>  |g| >= thr ** 3 (cube is monotone)
    lr0: float
    decoupled: bool


class EmoOptimizer(torch.optim.Optimizer):
    """Base class; see EmoSens / EmoAiry / EmoCats for the rules."""

    _state_dtype = staticmethod(state_dtype)
    _stacks_by_shape = False  # the accelerator form of the rule stacks same-shape tensors

    def __init__(self, params, defaults: dict[str, Any], *, foreach: bool | None,
                 fused: bool, sync_loss: bool) -> None:
        if defaults["lr"] < 0.0:
            raise ValueError(f"invalid lr: {defaults['lr']}")
        if not 0.0 <= defaults["eps"]:
            raise ValueError(f"invalid eps: {defaults['eps']}")
        b1, b2 = defaults["betas"]
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"invalid betas: {defaults['betas']}")
        if foreach and fused:
            raise ValueError("foreach and fused are mutually exclusive")
        defaults = dict(defaults, foreach=foreach, fused=fused)
        self.sync_loss = sync_loss
        self._emo = EmotionState()
        self._fused_warned = False
        self._last_step: tuple = ((), (), 0.0)  # effective lrs, shadow ratios, threshold
        self._count_next = False
        self._held_back: tuple = (None, 0)  # the last count: device tensor, elements
        super().__init__(params, defaults)

    # -- construction -----------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # lr0 is the group's constructor lr; schedulers only ever touch group["lr"].
        group.setdefault("lr0", float(group["lr"]))

    # -- public API -------------------------------------------------------------------
    @property
    def emotion(self) -> Emotion:
        """Read-only snapshot: s, short, long, should_stop, history, step, loss_seen."""
        return self._emo.view()

    @property
    def stats(self) -> StepStats:
        """What the last step did: s, the effective step size and shadow ratio per group,
        the filter threshold and, when counted, how many elements the filter held back."""
        lrs, ratios, thr = getattr(self, "_last_step", ((), (), 0.0))
        held, elements = getattr(self, "_held_back", (None, 0))
        e = self._emo
        return StepStats(e.step, e.s, e.short, e.long, lrs, ratios, thr, held, elements)

    def count_filter_next_step(self) -> None:
        """Count, during the next step only, the gradient elements the filter holds back
        (one extra pass over the gradients, no host sync; read ``stats``)."""
        self._count_next = True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None):
        """One update. The loss comes from ``closure()`` or ``loss=`` (float or 0-dim tensor)."""
        result = None
        if closure is not None:
            with torch.enable_grad():  # closures usually call backward()
                result = closure()
        if loss is None:
            loss = result
        elif result is None:
            result = loss
        value = loss_to_float(loss, self.sync_loss, self._first_device())
        s = self._emo.update(value, type(self).__name__)
        a = abs(s)
        thr = filter_threshold(s)
        counting, self._count_next = getattr(self, "_count_next", False), False
        held, elements, lrs, ratios = None, 0, [], []
        for group in self.param_groups:
            ratio = shadow_ratio(s, group["use_shadow"])
            b1, b2 = group["betas"]
            lr = float(group["lr"])
            hp = StepScalars(lr=lr, step_size=lr * (1.0 - a), wd=group["weight_decay"],
                             beta1=b1, beta2=b2, eps=group["eps"], thr=thr, thr3=thr ** 3,
                             lr0=group["lr0"],
                             decoupled=group.get("decoupled_weight_decay", False))
            if counting:  # before the update: the rule reads the same gradients
                for p in group["params"]:
                    if p.grad is not None and p.numel():
                        g = p.grad.float() if p.dtype in _LOW_PRECISION else p.grad
                        n = self._held_back_count(g, hp)
                        held = n if held is None else held + n.to(held.device)
                        elements += p.numel()
            self._step_group(group, hp, ratio)
            lrs.append(hp.step_size)
            ratios.append(ratio)
        self._last_step = (tuple(lrs), tuple(ratios), thr)
        self._held_back = (held, elements) if counting else (None, 0)
        return result

    def init_state(self, include_shadow: bool | None = None) -> None:
        """Allocate every parameter's state as the first step would, touching nothing else.

        Works on meta-device parameters (nothing is allocated), which is how the VRAM
        planner sizes a run: build on meta params, ``init_state()``, ``state_nbytes(opt)``.
        ``include_shadow`` (default: the group's ``use_shadow``) also allocates the shadow
        buffer, i.e. the peak footprint.
        """
        for group in self.param_groups:
            shadow = group["use_shadow"] if include_shadow is None else include_shadow
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    self._init_param_state(p, st)
                if shadow and "shadow" not in st:
                    st["shadow"] = torch.empty_like(p, dtype=state_dtype(p))
                    st["shadow_fresh"] = True  # first non-zero ratio copies p into it

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd[EMOTION_KEY] = self._emo.to_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        emotion = state_dict.pop(EMOTION_KEY, None)
        saved_state = state_dict.get("state", {})
        # torch casts state to the parameter dtype, which would turn our fp32 state of
        # bf16 parameters into bf16 (spec 8); load the groups through torch, state here.
        super().load_state_dict(dict(state_dict, state={}))
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid not in saved_state:
                continue
            st = {}
            for k, v in saved_state[pid].items():
                if isinstance(v, torch.Tensor):
                    dt = state_dtype(p) if v.is_floating_point() else v.dtype
                    w = v.to(device=p.device, dtype=dt)
                    st[k] = w.clone() if w is v else w
                else:
                    st[k] = v
            self.state[p] = st
        if emotion is not None:
            self._emo.load_dict(emotion)

    def __getstate__(self) -> dict[str, Any]:
        d = super().__getstate__()
        d[EMOTION_KEY] = self._emo.to_dict()
        d["sync_loss"] = self.sync_loss
        return d

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        emotion = state.pop(EMOTION_KEY, None)
        sync_loss = state.pop("sync_loss", None)
        super().__setstate__(state)
        if not hasattr(self, "_emo"):
            self._emo = EmotionState()
        if emotion is not None:
            self._emo.load_dict(emotion)
        if sync_loss is not None:
            self.sync_loss = sync_loss
        for group in self.param_groups:
            group.setdefault("lr0", float(group["lr"]))

    # -- orchestration ----------------------------------------------------------------
    def _first_device(self) -> torch.device | None:
        for g in self.param_groups:
            for p in g["params"]:
                return p.device
        return None

    def _step_group(self, group: dict[str, Any], hp: StepScalars, ratio: float) -> None:
        # Comprehensions rather than one loop with many branches: this runs over every
        # parameter on every step, and on CUDA its Python time adds to the step's.
        ps = [p for p in group["params"] if p.grad is not None]
        gs = [p.grad for p in ps]
        if any(g.is_sparse for g in gs):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if not all(p.numel() for p in ps):
            gs = [g for p, g in zip(ps, gs) if p.numel()]
            ps = [p for p in ps if p.numel()]
        state = self.state
        ss = [state[p] for p in ps]
        for p, st in zip(ps, ss):
            if not st:
                self._init_param_state(p, st)
        fused = group["fused"]
        foreach = group["foreach"]
        if foreach is None:
            foreach = not fused
        for (device, dtype), (bp, bg, bs) in _buckets(ps, gs, ss):
            if fused and self._fused_ready(device):
                self._run_list(bp, bg, bs, hp, ratio, dtype, self._fused)
            elif foreach or fused:
                size = CHUNK_NUMEL
                if on_accelerator(device):
                    size = DEVICE_CHUNK_NUMEL
                    if self._stacks_by_shape:  # same shapes adjacent: fewer, larger stacks
                        bp, bg, bs = _by_shape(bp, bg, bs)
                for lo, hi in _chunks(bp, size):
                    self._run_list(bp[lo:hi], bg[lo:hi], bs[lo:hi], hp, ratio, dtype, self._foreach)
            else:
                for p, g, st in zip(bp, bg, bs):
                    self._run_single(p, g, st, hp, ratio)

    def _fused_ready(self, device: torch.device) -> bool:
        if device.type == "cpu" and _native.available():
            return True
        if not getattr(self, "_fused_warned", False):
            self._fused_warned = True
            why = "no CPU kernel for " + device.type if device.type != "cpu" else _native._error
            warnings.warn(f"{type(self).__name__}(fused=True): {why}; using the foreach path.")
        return False

    def _run_list(self, ps, gs, ss, hp, ratio, dtype, kernel) -> None:
        if dtype in _LOW_PRECISION:
            # Update computed in float32 and written back (spec 8).
            if on_accelerator(ps[0].device):
                work, gs = _float_copies(ps), _float_copies(gs)
            else:
                work = [p.float() for p in ps]
                gs = [g.float() for g in gs]
        else:
            work = ps
        if ratio > 0.0:
            self._shadow_list(work, ss, ratio)
        kernel(work, gs, ss, hp)
        if work is not ps:
            torch._foreach_copy_(ps, work)

    def _run_single(self, p, g, st, hp, ratio) -> None:
        low = p.dtype in _LOW_PRECISION
        work = p.float() if low else p
        g = g.float() if low else g
        if ratio > 0.0:
            self._shadow_list([work], [st], ratio)
        self._single(work, g, st, hp)
        if low:
            p.copy_(work)

    @staticmethod
    def _shadow_list(work: list[torch.Tensor], ss: list[dict], ratio: float) -> None:
        ps, shadows = [], []
        for p, st in zip(work, ss):
            sh = st.get("shadow")
            if sh is None:
                # Lazily created on the first non-zero ratio; no blend on that step (spec 2).
                st["shadow"] = p.detach().clone()
            elif st.pop("shadow_fresh", False):
                sh.copy_(p)  # pre-allocated by init_state(): same first-time semantics
            else:
                ps.append(p)
                shadows.append(sh)
        shadow_blend_(ps, shadows, ratio)

    # -- rule hooks (subclasses) -------------------------------------------------------
    def _held_back_count(self, g: torch.Tensor, hp: StepScalars) -> torch.Tensor:
        """Elements of ``g`` the rule's filter closes this step (a 0-dim tensor)."""
        raise NotImplementedError

    def _init_param_state(self, p: torch.Tensor, st: dict) -> None:
        raise NotImplementedError

    def _single(self, p, g, st, hp: StepScalars) -> None:
        raise NotImplementedError

    def _foreach(self, ps, gs, ss, hp: StepScalars) -> None:
        raise NotImplementedError

    def _fused(self, ps, gs, ss, hp: StepScalars) -> None:
        raise NotImplementedError


def _buckets(ps, gs, ss):
    """((device, dtype), (params, grads, states)) per device and dtype, in first-seen order."""
    keys = [(p.device, p.dtype) for p in ps]
    first = keys[0] if keys else None
    if all(k == first for k in keys):
        return [(first, (ps, gs, ss))] if keys else []
    out: dict[tuple, tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
    for k, p, g, st in zip(keys, ps, gs, ss):
        bp, bg, bs = out[k]
        bp.append(p)
        bg.append(g)
        bs.append(st)
    return list(out.items())


def _by_shape(ps, gs, ss):
    groups: dict[torch.Size, list[int]] = {}
    for i, p in enumerate(ps):
        groups.setdefault(p.shape, []).append(i)
    order = [i for idx in groups.values() for i in idx]
    return [ps[i] for i in order], [gs[i] for i in order], [ss[i] for i in order]


def _chunks(ps: list[torch.Tensor], size: int = CHUNK_NUMEL):
    lo, acc = 0, 0
    for i, p in enumerate(ps):
        acc += p.numel()
        if acc >= size:
            yield lo, i + 1
            lo, acc = i + 1, 0
    if lo < len(ps):
        yield lo, len(ps)


def _float_copies(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """float32 copies of ``ts`` as views of one buffer: one allocation and one foreach copy
    instead of a cast kernel per tensor."""
    numels = [t.numel() for t in ts]
    flat = torch.empty(sum(numels), dtype=torch.float32, device=ts[0].device)
    out = [v.view(t.shape) for v, t in zip(flat.split(numels), ts)]
    torch._foreach_copy_(out, ts)
    return out


def open_masks(gs: list[torch.Tensor], thr3: float, strict_square: bool = False) -> list[torch.Tensor]:
    """The filter as a factor per element, 1 where it lets the update through and 0 where
    it holds it back, computed without leaving the device (the accelerator paths).

    sign(|g| - thr3) is exactly -1, 0 or 1 (a rounded difference keeps its sign and is 0
    only for equal operands), so min(sign + 1, 1) is [|g| >= thr3]; ``strict_square``
    (EmoAiry's vectors): max(sign(g*g - thr3), 0) is [g*g > thr3].
    """
    if strict_square:
        m = torch._foreach_mul(gs, gs)
    else:
        m = torch._foreach_abs(gs)
    torch._foreach_sub_(m, thr3)
    torch._foreach_sign_(m)
    if strict_square:
        torch._foreach_clamp_min_(m, 0.0)
    else:
        torch._foreach_add_(m, 1.0)
        torch._foreach_clamp_max_(m, 1.0)
    return m


def masked_indices(gs: list[torch.Tensor], limit: float, strict_square: bool = False) -> list[int]:
    """Indices of tensors that may hold an element the filter closes (a superset).

    The filter almost never closes (it needs |g| below ~1e-12), so the fast paths look
    for such tensors first and mask only those, exactly. ``strict_square``: an element
    passes only when g*g > limit (EmoAiry vectors), otherwise when |g| >= limit.
    The smallest |g| of each tensor is read as the largest 1/|g|: torch's min-norm
    (ord=-inf) is some 20x slower on the CPU than abs + reciprocal + max.
    """
    if not gs:
        return []
    edge = math.sqrt(limit) if strict_square else limit
    inv = torch._foreach_abs(gs)
    torch._foreach_reciprocal_(inv)
    top = torch.stack(torch._foreach_max(inv))
    del inv
    # the margin covers the rounding of 1/|g| and of g*g: borderline tensors get the
    # exact test, never skip it
    return (top >= (1.0 / edge) * (1 - 1e-6)).nonzero().flatten().tolist()
