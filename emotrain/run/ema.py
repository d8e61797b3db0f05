"""The EMA of the LoRA (``--ema-decay``): one fp32 copy of every trained parameter.

Definition (plain, as sd-scripts-style trainers keep it; no warm-up, no bias correction):
the EMA starts as an exact fp32 copy of the weights the run starts from (a fresh LoRA,
or --network-weights), and after every optimizer step ``t`` (a step the fp16 GradScaler
skipped included: the weights are then unchanged)

    ema_t = decay * ema_{t-1} + (1 - decay) * weights_t

computed in place as ``torch._foreach_lerp_(ema, weights, 1 - decay)``: one fused pass
over all tensors, no allocation on the device. The EMA lives on the training device, or
in CPU memory with ``--ema-on-cpu`` (the weights are then copied to the CPU each step).
Its tensors go into every checkpoint (``ema.safetensors``, disk/checkpoint.py) and come
back on ``--resume``, so a resumed run's EMA equals an uninterrupted run's bit for bit.

``swapped_in`` puts the EMA into the live parameters (validation, samples, the saved
``lora-ema`` files) and the training weights back afterwards exactly (a kept copy, not
a recomputation): evaluating with the EMA never changes the training.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import UserError
from ..optimizers import is_schedule_free


class LoraEma:
    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float, device=None):
        if not 0 < decay < 1:
            raise ValueError(f"an EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.names = list(named_params)
        self.params = [named_params[n] for n in self.names]
        with torch.no_grad():
            self.tensors = [p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                            for p in self.params]
        self.device = self.tensors[0].device if self.tensors else torch.device("cpu")
        # Decided once: the parameters stay where the run put them (the EMA is made after that).
        self._moves = any(p.device != self.device or p.dtype != torch.float32 for p in self.params)

    @torch.no_grad()
    def update(self) -> None:
        """One step: ema <- ema + (1 - decay) * (weights - ema), every tensor at once."""
        weights = [p.detach() for p in self.params]
        if self._moves:  # --ema-on-cpu (or a non-fp32 LoRA): copies queued, then one wait for them all
            weights = [w.to(device=self.device, dtype=torch.float32, non_blocking=True) for w in weights]
            if self.params[0].device.type == "cuda":
                torch.cuda.current_stream(self.params[0].device).synchronize()
        torch._foreach_lerp_(self.tensors, weights, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA by parameter name, on the CPU (what a checkpoint holds)."""
        return {n: t.detach().cpu().contiguous() for n, t in zip(self.names, self.tensors)}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], where: str = "the checkpoint") -> None:
        differ = sorted(set(self.names) ^ set(tensors))
        if differ:
            raise UserError(f"{where}: its EMA does not match this model's LoRA (first differing key "
                            f"{differ[0]!r}): resume with the checkpoint's own config")
        for name, t in zip(self.names, self.tensors):
            if tuple(tensors[name].shape) != tuple(t.shape):
                raise UserError(f"{where}: the EMA of {name} is {tuple(tensors[name].shape)}, the LoRA's "
                                f"{tuple(t.shape)}: resume with the checkpoint's own config")
            t.copy_(tensors[name])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @contextmanager
    def swapped_in(self):
        """Inside: the parameters hold the EMA; afterwards the training weights, bit for bit."""
        with torch.no_grad():
            params = [p.detach() for p in self.params]
            kept = [p.clone() for p in params]  # bit-exact copies (x + 0 would turn -0.0 into +0.0)
            torch._foreach_copy_(params, self.tensors)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, kept)


def ema_for_run(cfg, named_params: dict, optimizer, device) -> LoraEma | None:
    """The run's EMA, or None with --ema-decay 0. A schedule-free optimizer (a custom
    class too) is refused: it already averages its weights."""
    if not cfg.ema_decay:
        return None
    if is_schedule_free(optimizer):
        raise UserError(f"--optim {cfg.optim} is schedule-free: it already averages its weights (its saved LoRA is "
                        "that average): drop --ema-decay or pick another --optim")
    return LoraEma(named_params, cfg.ema_decay, torch.device("cpu") if cfg.ema_on_cpu else device)
