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
# Foreach lists are processed in chunks of about this many elements: it bounds the
# temporaries of a step to two chunk-sized buffers and keeps each chunk cache-resident
# across the several passes of an update.
CHUNK_NUMEL = 1 << 16
EMOTION_KEY = "emotion"  # reserved top-level key of state_dict()


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
        buckets: dict[tuple, tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
        state = self.state
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if p.numel() == 0:
                continue
            st = state[p]
            if not st:
                self._init_param_state(p, st)
            ps, gs, ss = buckets[(p.device, p.dtype)]
            ps.append(p)
            gs.append(g)
            ss.append(st)
        fused = group["fused"]
        foreach = group["foreach"]
        if foreach is None:
            foreach = not fused
        for (device, dtype), (ps, gs, ss) in buckets.items():
            if fused and self._fused_ready(device):
                self._run_list(ps, gs, ss, hp, ratio, dtype, self._fused)
            elif foreach or fused:
                for lo, hi in _chunks(ps):
                    self._run_list(ps[lo:hi], gs[lo:hi], ss[lo:hi], hp, ratio, dtype,
                                   self._foreach)
            else:
                for p, g, st in zip(ps, gs, ss):
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


def _chunks(ps: list[torch.Tensor]):
    lo, acc = 0, 0
    for i, p in enumerate(ps):
        acc += p.numel()
        if acc >= CHUNK_NUMEL:
            yield lo, i + 1
            lo, acc = i + 1, 0
    if lo < len(ps):
        yield lo, len(ps)


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
