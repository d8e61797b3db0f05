"""What the Emo family shares: emotion state, shadow-system, filter threshold, calm signal.

Spec: optim/SPEC.md, sections 1, 2, 3 and 7. Everything here is plain
Python floats: the emotion state is one scalar pipeline per optimizer, not per tensor.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch

# Emotion averages (spec 1).
SHORT_ALPHA = 0.3
LONG_ALPHA = 0.01
SCALAR_GAIN = 5.0

# Shadow-system ratio bands (spec 2); both non-zero bands reduce to ratio = |s| but are
# kept in the published piecewise form so each band can be retuned on its own.
SHADOW_HIGH_EDGE = 0.6
SHADOW_HIGH_BASE = 0.6
SHADOW_HIGH_SPAN = 0.4
SHADOW_HIGH_GAIN = 0.4
SHADOW_LOW_EDGE = 0.1
SHADOW_LOW_BASE = 0.1
SHADOW_LOW_SPAN = 0.5
SHADOW_LOW_GAIN = 0.5
SHADOW_FOLLOW = 0.05  # how fast the shadow follows the blended parameter

# Shadow-effect filter (spec 3).
FILTER_BASE = 1e-4

# Calm signal (spec 7).
CALM_WINDOW = 32
CALM_MEAN_ABS = 0.05
CALM_VARIANCE = 0.005

NO_LOSS_WARNING = (
    "{name}.step() was called without a loss: the emotion state is unchanged and the last "
    "emotion scalar is reused. Pass the training loss as step(loss=loss) (or a closure) "
    "so the emotion mechanism sees it."
)


def shadow_ratio(s: float, use_shadow: bool) -> float:
    """Blend weight of the shadow for emotion scalar s (0 = no blend)."""
    if not use_shadow:
        return 0.0
    a = abs(s)
    if a > SHADOW_HIGH_EDGE:
        return SHADOW_HIGH_BASE + (a - SHADOW_HIGH_EDGE) / SHADOW_HIGH_SPAN * SHADOW_HIGH_GAIN
    if a > SHADOW_LOW_EDGE:
        return SHADOW_LOW_BASE + (a - SHADOW_LOW_EDGE) / SHADOW_LOW_SPAN * SHADOW_LOW_GAIN
    return 0.0


def filter_threshold(s: float) -> float:
    """Root-of-gradient level below which an element is held back this step."""
    return FILTER_BASE * (1.0 + abs(s))


class Emotion(NamedTuple):
    """Read-only snapshot of the emotion state (``optimizer.emotion``)."""

    s: float
    short: float | None
    long: float | None
    should_stop: bool
    history: tuple
    step: int
    loss_seen: bool


class EmotionState:
    """The one emotion pipeline of an optimizer: loss intake, averages, scalar, calm signal."""

    def __init__(self) -> None:
        self.short: float | None = None
        self.long: float | None = None
        self.s = 0.0
        self.history: list[float] = []
        self.should_stop = False
        self.step = 0
        self.loss_seen = False
        self._warned = False

    def update(self, loss: float | None, owner: str) -> float:
        """Advance one optimizer step; returns the scalar s to use for it."""
        self.step += 1
        if loss is None:
            # Published code feeds L = 0 here, which fakes a loss drop (spec 1, deviation).
            if not self._warned:
                warnings.warn(NO_LOSS_WARNING.format(name=owner), stacklevel=4)
                self._warned = True
            return self.s
        if not self.loss_seen:
            self.short = self.long = loss
            self.loss_seen = True
        self.short = SHORT_ALPHA * loss + (1.0 - SHORT_ALPHA) * self.short
        self.long = LONG_ALPHA * loss + (1.0 - LONG_ALPHA) * self.long
        self.s = math.tanh(SCALAR_GAIN * (self.short - self.long))
        self._observe(self.s)
        return self.s

    def _observe(self, s: float) -> None:
        # Once per step (the published code appends once per parameter, spec 7).
        self.history.append(s)
        if len(self.history) > CALM_WINDOW:
            del self.history[0]
        if len(self.history) == CALM_WINDOW and not self.should_stop:
            mean = sum(self.history) / CALM_WINDOW
            mean_abs = sum(abs(x) for x in self.history) / CALM_WINDOW
            var = sum((x - mean) ** 2 for x in self.history) / CALM_WINDOW
            self.should_stop = mean_abs < CALM_MEAN_ABS and var < CALM_VARIANCE

    def view(self) -> Emotion:
        return Emotion(self.s, self.short, self.long, self.should_stop,
                       tuple(self.history), self.step, self.loss_seen)

    def to_dict(self) -> dict[str, Any]:
        # Python scalars and lists only, so torch.load(weights_only=True) accepts it.
        return {"short": self.short, "long": self.long, "s": self.s,
                "history": list(self.history), "should_stop": self.should_stop,
                "step": self.step, "loss_seen": self.loss_seen}

    def load_dict(self, d: dict[str, Any]) -> None:
        self.short = None if d["short"] is None else float(d["short"])
        self.long = None if d["long"] is None else float(d["long"])
        self.s = float(d["s"])
        self.history = [float(x) for x in d["history"]]
        self.should_stop = bool(d["should_stop"])
        self.step = int(d["step"])
        self.loss_seen = bool(d["loss_seen"])


def loss_to_float(loss: Any, sync: bool, device: torch.device | None) -> float | None:
    """The step's loss as a Python float, averaged over ranks when data-parallel."""
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError("loss must be a float or a one-element tensor")
        device = loss.device
        value = loss.detach().to(torch.float64).reshape(())
    else:
        value = float(loss)
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            # Every rank must see the same s or replicas drift apart (spec 1).
            if torch.distributed.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            elif device is None or device.type == "meta":
                device = torch.device("cpu")
            buf = torch.as_tensor(value, dtype=torch.float64).reshape(1).to(device)
            torch.distributed.all_reduce(buf)
            return buf.item() / world
    return value.item() if isinstance(value, torch.Tensor) else value


def shadow_blend_(params: list[torch.Tensor], shadows: list[torch.Tensor], ratio: float) -> None:
    """p <- (1 - ratio) p + ratio shadow, then the shadow follows the blended p."""
    if not params:
        return
    torch._foreach_lerp_(params, shadows, ratio)
    torch._foreach_lerp_(shadows, params, SHADOW_FOLLOW)
