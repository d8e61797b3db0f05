"""Activation memory by tracing one real training step, without a GPU and without weights.

``LiveStorages`` is a dispatch mode that sees every tensor an op returns and follows its
storage until it is freed: the live bytes at each moment of the step, and so the peak,
are what the code really allocates (the same tracker counts a real step in the tests).
``trace_step`` runs the run's own UNet with its adapter (built on the meta device, then
turned into fake tensors) through ``emotrain.loss.Objective`` and back, under
``FakeTensorMode``: shapes and dtypes only, no memory, no arithmetic.

The trace runs on the CPU (a CPU-only torch cannot run autograd on fake CUDA tensors),
with CUDA's autocast rules where they differ from the CPU's: CUDA's autocast computes
group_norm and layer_norm in float32 (the CPU's keeps bfloat16), which doubles those
activations. Matrix products, convolutions and attention are cast to the low precision by both.
``cuda_autocast_rules`` applies the difference in the norms' forward, where CUDA's
autocast would cast.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

# The CUDA caching allocator hands out blocks in multiples of 512 bytes
# (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize): what torch.cuda.max_memory_allocated
# counts for a tensor is its size rounded up to that.
CUDA_BLOCK = 512


def cuda_rounded(nbytes: int) -> int:
    return -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK if nbytes else 0


@dataclass
class Timeline:
    """Allocations (+key) and frees (-key - 1) in order, with each key's bytes."""
    sizes: list[int] = field(default_factory=list)
    events: list[int] = field(default_factory=list)

    def peak(self, skip: frozenset = frozenset(), rounding=None) -> int:
        """The largest sum of live bytes, leaving out the keys in ``skip``."""
        size = (lambda k: rounding(self.sizes[k])) if rounding else (lambda k: self.sizes[k])
        live = peak = 0
        for e in self.events:
            if e >= 0:
                if e not in skip:
                    live += size(e)
                    peak = max(peak, live)
            elif ~e not in skip:
                live -= size(~e)
        return peak


class LiveStorages(TorchDispatchMode):
    """Follows the storage of every tensor an op returns until it is freed. Storages
    marked ``known`` (parameters, inputs) are not counted."""

    def __init__(self):
        super().__init__()
        self.keys = WeakIdKeyDictionary()
        self.timeline = Timeline()

    def known(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.keys.setdefault(t.untyped_storage(), None)

    def key_of(self, t: torch.Tensor):
        return self.keys.get(t.untyped_storage())

    def _see(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self.keys:
            return
        key = len(self.timeline.sizes)
        self.timeline.sizes.append(st.nbytes())
        self.timeline.events.append(key)
        self.keys[st] = key
        weakref.finalize(st, self.timeline.events.append, ~key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t)
        return out


# CUDA autocast's float32 list, as far as SDXL's networks use it (aten's
# autocast_mode.cpp, KERNEL_CUDA(..., fp32)): group_norm and layer_norm run in float32 on
# CUDA (input, weight and bias cast up) and keep the input's dtype under the CPU's autocast.
def _cuda_norm_rule(norm: torch.nn.Module):
    import torch.nn.functional as F

    plain = norm.forward

    def up(t):
        return None if t is None else t.float()

    def forward(x):
        if not torch.is_autocast_enabled("cpu"):
            return plain(x)
        if isinstance(norm, torch.nn.GroupNorm):
            return F.group_norm(x.float(), norm.num_groups, up(norm.weight), up(norm.bias), norm.eps)
        return F.layer_norm(x.float(), norm.normalized_shape, up(norm.weight), up(norm.bias), norm.eps)
    return forward


def cuda_autocast_rules(module: torch.nn.Module) -> None:
    """Make ``module``'s norms follow CUDA's autocast under the CPU's (in its forward, so
    a checkpoint's recomputation follows it too)."""
    for m in module.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            m.forward = _cuda_norm_rule(m)


def _as_fake(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` (on the meta device) as fake CPU tensors: frozen floating weights in
    ``dtype``, adapter weights float32 (as add_lora keeps them). Call under FakeTensorMode."""
    module = module.to_empty(device="cpu")
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_floating_point():
                sub._parameters[name] = torch.nn.Parameter(p.to(torch.float32 if p.requires_grad else dtype),
                                                           requires_grad=p.requires_grad)
    return module


def _encode(encoders, batch: int, tokens: int):
    """Both text encoders' forward on ``batch`` captions of ``tokens`` tokens, as
    sdxl.encode_prompts joins them: the penultimate hidden states side by side and the
    second encoder's pooled projection."""
    ids = torch.zeros(batch, tokens, dtype=torch.long)
    outs = [encoder(ids, output_hidden_states=True) for encoder in encoders]
    return torch.cat([o.hidden_states[-2] for o in outs], dim=-1), outs[-1][0]


def trace_step(unet: torch.nn.Module, batch: int, latent_hw: tuple[int, int], dtype: torch.dtype,
               checkpointing: bool, objective, scheduler, *, fake: bool = True, text_dims=(77, 2048, 1280),
               encoders: tuple = ()) -> dict:
    """One training step's forward and backward of ``unet`` (meta device when ``fake``,
    else real CPU weights) on a batch of ``batch`` latents of ``latent_hw`` (with
    ``encoders``, the trained text encoders, encoding the captions first); the live
    bytes of what it allocates. -> {"peak_bytes", "peak_bytes_cuda", "activation_peak_bytes",
    "activation_peak_bytes_cuda", "grad_bytes"}: the peaks with and without the LoRA's
    gradients, as counted and rounded to CUDA's blocks."""
    from contextlib import nullcontext
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
    tracker = LiveStorages()
    with mode:
        if fake:
            unet = _as_fake(unet, dtype)
            encoders = tuple(_as_fake(e, dtype) for e in encoders)
        for e in encoders:  # trained text encoders: their forward is part of the step
            e.train()
            cuda_autocast_rules(e)
            if checkpointing:
                e.gradient_checkpointing_enable()
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        tokens, hidden, pooled = text_dims
        h, w = latent_hw
        inputs = {"latents": torch.randn(batch, unet.config.in_channels, h, w),
                  "hidden": torch.randn(batch, tokens, hidden), "pooled": torch.randn(batch, pooled),
                  "time_ids": torch.tensor([h * 8, w * 8, 0, 0, h * 8, w * 8], dtype=torch.float32).repeat(batch, 1)}
        modules = (unet, *encoders)
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        tracker.known([t for m in modules for t in (*m.parameters(), *m.buffers())] + list(inputs.values()))
        generator = torch.Generator().manual_seed(0)
        autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
        cuda_autocast_rules(unet)
        with tracker:
            with autocast:
                if encoders:
                    inputs["hidden"], inputs["pooled"] = _encode(encoders, batch, tokens)
                loss = objective.loss(unet, scheduler, inputs["latents"], inputs["hidden"], inputs["pooled"],
                                      inputs["time_ids"], generator)
            loss.backward()  # outside autocast, as on CUDA (its backward runs on another thread)
            del loss
        grads = frozenset(k for k in (tracker.key_of(p.grad) for p in params if p.grad is not None) if k is not None)
        timeline = tracker.timeline
        grad_bytes = sum(timeline.sizes[k] for k in grads)
        for p in params:
            p.grad = None
    return {"peak_bytes": timeline.peak(), "peak_bytes_cuda": timeline.peak(rounding=cuda_rounded),
            "activation_peak_bytes": timeline.peak(grads),
            "activation_peak_bytes_cuda": timeline.peak(grads, rounding=cuda_rounded),
            "grad_bytes": grad_bytes, "tensors": len(timeline.sizes)}
