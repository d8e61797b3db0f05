"""``--fp8-base``: the frozen UNet's weights stored in float8 (e4m3) and computed in bf16,
one layer at a time.

Contract:
- ``fp8_layers(unet)`` names the layers stored in float8: every frozen ``Linear`` and
  ``Conv2d`` whose module name matches none of ``SKIP`` (a layer wrapped by an adapter is
  matched by the name of the layer it wraps: the patterns take a suffix).
  A layer with a trainable parameter (an adapter's own down and up layers) is never
  one of them: the adapter stays in its fp32 master weights.
- ``SKIP``: of diffusers' layerwise-casting default patterns only ``norm`` names SDXL
  layers (and GroupNorm and LayerNorm are not stored types anyway: every norm keeps the
  training precision); added: SDXL's first and last convolutions and the timestep and
  size/pooled-text embeddings, the layers whose rounding no later layer averages out.
  What is left out holds 0.31% of SDXL's UNet parameters (7.9 M of 2,567 M).
- ``store_fp8(unet)`` stores those layers (called after the adapter is injected, so peft
  sizes and initialises the adapter from the bf16 weights, exactly as without
  ``--fp8-base``); ``fp8_frozen_bytes`` is what the plan counts for them. The same
  ``fp8_layers`` decides both, so plan and run cannot disagree on which layers shrink.
- A stored layer's forward casts its weight to bf16, computes, and keeps nothing of the
  bf16 copy: its backward (the input's gradient; the weight is frozen) casts again. The
  fused LoRA forward (lora/fast.py) reads the base weight through ``stored_dtype``, the
  same cast.

Why not diffusers' layerwise casting (``apply_layerwise_casting``, diffusers 0.42): its
hook casts the module's parameters in place before and after each forward, which suits
inference but not training: autograd saves a ``Conv2d``'s weight parameter itself, so the
backward finds it float8 again and fails ("expected scalar type BFloat16 but found
Float8_e4m3fn"), and a ``Linear`` keeps each layer's bf16 copy alive until its backward,
which gives the saving back. Here only the float8 weight stays between forward and backward.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

STORAGE = torch.float8_e4m3fn
COMPUTE = torch.bfloat16
SKIP = ("norm", r"^conv_in(\.|$)", r"^conv_out(\.|$)", r"^time_embedding\.", r"^add_embedding\.")
HOOKED = (torch.nn.Linear, torch.nn.Conv2d)


def fp8_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The frozen layers ``--fp8-base`` stores in float8, by module name."""
    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, HOOKED) or any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if any(re.search(pattern, name) for pattern in SKIP):
            continue
        out[name] = module
    return out


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        dtype = layer.fp8_compute
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return F.linear(x.to(dtype), layer.weight.to(dtype), stored_dtype(layer.bias, dtype))

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.layer.weight.to(grad.dtype)
        return (grad @ weight).to(ctx.x_dtype), None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        dtype = layer.fp8_compute
        ctx.layer, ctx.x_dtype, ctx.shape = layer, x.dtype, x.shape
        return layer._conv_forward(x.to(dtype), layer.weight.to(dtype), stored_dtype(layer.bias, dtype))

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        gx = torch.nn.grad.conv2d_input(ctx.shape, layer.weight.to(grad.dtype), grad, layer.stride, layer.padding,
                                        layer.dilation, layer.groups)
        return gx.to(ctx.x_dtype), None


class Fp8Linear(torch.nn.Linear):
    """A frozen Linear stored in float8, computed in ``fp8_compute``."""
    fp8_compute: torch.dtype

    def forward(self, x):
        return _Linear.apply(x, self)


class Fp8Conv2d(torch.nn.Conv2d):
    """A frozen Conv2d stored in float8, computed in ``fp8_compute`` (zero padding: SDXL's)."""
    fp8_compute: torch.dtype

    def forward(self, x):
        return _Conv2d.apply(x, self)


_STORED = {torch.nn.Linear: Fp8Linear, torch.nn.Conv2d: Fp8Conv2d}


def store_fp8(unet: torch.nn.Module, compute_dtype: torch.dtype = COMPUTE) -> int:
    """Store ``fp8_layers(unet)`` in float8, each computed in ``compute_dtype``; -> how
    many layers."""
    layers = fp8_layers(unet)
    # Under DistributedDataParallel the stored weights are not broadcast (gloo has no
    # float8; NCCL would send bytes for nothing): each process loaded and cast the same
    # file the same way, and frozen weights get no gradient to reduce.
    from torch.nn.parallel import DistributedDataParallel
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        unet, [f"{name}.{p}" for name, m in layers.items() for p, _ in m.named_parameters(recurse=False)])
    for module in layers.values():
        if type(module) not in _STORED or getattr(module, "padding_mode", "zeros") != "zeros":
            raise TypeError(f"--fp8-base cannot store a {type(module).__name__} layer")
        with torch.no_grad():
            for p in module.parameters(recurse=False):
                p.data = p.data.to(STORAGE)
        module.__class__ = _STORED[type(module)]
        module.fp8_compute = compute_dtype
    return len(layers)


def fp8_frozen_bytes(unet: torch.nn.Module) -> int:
    """Bytes of the weights ``store_fp8`` stores (one byte a value); the rest of the UNet
    keeps the training precision."""
    return sum(t.numel() for m in fp8_layers(unet).values() for t in m.parameters(recurse=False))


def fp8_cast_bytes(unet: torch.nn.Module, compute_dtype: torch.dtype = COMPUTE) -> int:
    """The largest stored layer's copy in ``compute_dtype`` (weight and bias): what a
    step holds beyond the float8 weights while that layer computes, one layer at a time."""
    size = torch.empty((), dtype=compute_dtype).element_size()
    return size * max((sum(p.numel() for p in m.parameters(recurse=False)) for m in fp8_layers(unet).values()),
                      default=0)


def stored_dtype(weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """A base weight as a layer computes with it: float8 storage cast to ``compute_dtype``
    (a transient copy of one layer), any other weight unchanged."""
    return weight.to(compute_dtype) if weight is not None and weight.dtype == STORAGE else weight
