"""The ``lora`` kind's forward under mixed precision, in fewer operations than peft's.

peft computes a LoRA layer under autocast as: the base layer; the input cast to fp32 (the
adapter's dtype); autocast casting it back, and the two factors, to bf16 for each matrix
product; an identity dropout; the product scaled (one pass over the output) and added
(another). Each of those is an operation on the activation, and autograd adds as many
again in the backward: on SDXL about two thirds of a step's operations were the
adapters'. Here one autograd function per layer computes, in the autocast dtype,

    y = x W^T + b,   h = x A^T,   out = y + s * h B^T   (one ``addmm``: scale and sum fused)

with A and B cast once per step (cached until the layer's backward has run, so the
recomputation under gradient checkpointing does not cast again) and writes the gradients
of the fp32 factors in fp32 (the master weights stay fp32). 3x3 convolutions (LoCon) do
the same with convolutions and one ``add`` with ``alpha``. Without autocast (fp32 runs)
the layer runs peft's own forward, unchanged bit for bit. A base layer stored in float8
(``--fp8-base``, sdxl/fp8.py) is cast to the compute dtype where it is used, in the
forward and again in the backward, one layer at a time, as diffusers' hook does for it.

``install(model, adapter)`` swaps the classes of the model's plain ``lora`` layers (one adapter,
no dropout, no bias on B, no variant) for the subclasses below; any other layer keeps
peft's forward. The results equal peft's within bf16 rounding (tests/emotrain/lora/).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as peft_layer

from ..sdxl import stored_dtype

CACHE = "_emotrain_casts"  # the layer attribute holding (key, a, b) between forward and backward


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype where autocast is on and lower than the adapter's, else None."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype != weight.dtype else None


def _casts(layer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B in ``dtype``: cast once, then reused until the weights change or the layer's
    backward releases them (outside autograd: the function writes the factors' gradients)."""
    A, B = layer.lora_A[layer.emotrain_adapter].weight, layer.lora_B[layer.emotrain_adapter].weight
    key = (A._version, B._version, dtype)  # an optimizer step or a load bumps the versions
    cached = getattr(layer, CACHE, None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    with torch.no_grad():
        a, b = A.to(dtype), B.to(dtype)
    if torch.is_grad_enabled():  # kept for the recomputation and the backward only
        setattr(layer, CACHE, (key, a, b))
    return a, b


def _release(layer) -> None:
    if getattr(layer, CACHE, None) is not None:
        setattr(layer, CACHE, None)


class _LinearLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, layer, a, b, scale):
        base = layer.base_layer
        weight, bias = stored_dtype(base.weight, x.dtype), stored_dtype(base.bias, x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
        h = torch.mm(x2, a.t())
        out = torch.addmm(y, h, b.t(), alpha=scale)
        ctx.save_for_backward(x2, h)
        ctx.layer, ctx.a, ctx.b, ctx.scale, ctx.shape = layer, a, b, scale, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, h = ctx.saved_tensors
        a, b, s = ctx.a, ctx.b, ctx.scale
        g = grad.reshape(-1, grad.shape[-1])
        gh = torch.mm(g, b)
        gx = gA = gB = None
        if ctx.needs_input_grad[0]:
            weight = stored_dtype(ctx.layer.base_layer.weight, g.dtype)
            gx = torch.addmm(torch.mm(g, weight), gh, a, alpha=s).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            gA = torch.mm(gh.t(), x2).float().mul_(s)
        if ctx.needs_input_grad[2]:
            gB = torch.mm(g.t(), h).float().mul_(s)
        _release(ctx.layer)
        return gx, gA, gB, None, None, None, None


def _conv_args(conv) -> tuple:
    return conv.stride, conv.padding, conv.dilation, conv.groups


class _ConvLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, layer, a, b, scale):
        base, down = layer.base_layer, layer.lora_A[layer.emotrain_adapter]
        y = F.conv2d(x, stored_dtype(base.weight, x.dtype), stored_dtype(base.bias, x.dtype), *_conv_args(base))
        h = F.conv2d(x, a, None, *_conv_args(down))
        out = torch.add(y, F.conv2d(h, b), alpha=scale)
        ctx.save_for_backward(x, h)
        ctx.layer, ctx.a, ctx.b, ctx.scale = layer, a, b, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        x, h = ctx.saved_tensors
        layer, a, b = ctx.layer, ctx.a, ctx.b
        base, down = layer.base_layer, layer.lora_A[layer.emotrain_adapter]
        backward = torch.ops.aten.convolution_backward
        gs = grad * ctx.scale
        gh, gB, _ = backward(gs, h, b, None, (1, 1), (0, 0), (1, 1), False, (0, 0), 1,
                             [True, ctx.needs_input_grad[2], False])
        stride, padding, dilation, groups = _conv_args(down)
        gx, gA, _ = backward(gh, x, a, None, stride, padding, dilation, False, (0, 0), groups,
                             [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        if gx is not None:
            stride, padding, dilation, groups = _conv_args(base)
            gx = gx + backward(grad, x, stored_dtype(base.weight, grad.dtype), None, stride, padding, dilation, False, (0, 0), groups,
                               [True, False, False])[0]
        _release(layer)
        return (gx, None if gA is None else gA.float(), None if gB is None else gB.float(),
                None, None, None, None)


class _Fast:
    """Mixed into peft's layer classes: the fused forward under autocast."""

    emotrain_adapter: str  # the layer's one adapter (``install`` sets it)

    def forward(self, x, *args, **kwargs):
        name = self.emotrain_adapter
        A = self.lora_A[name].weight
        dtype = _compute_dtype(x, A)
        if dtype is None or args or kwargs or self.disable_adapters or self.merged \
                or list(self.active_adapters) != [name] or self.base_layer.weight.requires_grad:
            return super().forward(x, *args, **kwargs)
        a, b = _casts(self, dtype)
        x = x if x.dtype == dtype else x.to(dtype)
        return self._function.apply(x, A, self.lora_B[name].weight, self, a, b, float(self.scaling[name]))


class FastLinear(_Fast, peft_layer.Linear):
    _function = _LinearLora


class FastConv2d(_Fast, peft_layer.Conv2d):
    _function = _ConvLora


_FAST = {peft_layer.Linear: FastLinear, peft_layer.Conv2d: FastConv2d}


def plain(layer, adapter: str) -> bool:
    """Whether ``layer`` carries exactly the plain LoRA this forward computes."""
    if type(layer) not in _FAST or list(layer.lora_A) != [adapter] or layer.lora_variant:
        return False
    if not isinstance(layer.lora_dropout[adapter], torch.nn.Identity) or layer.lora_B[adapter].bias is not None:
        return False
    if isinstance(layer, peft_layer.Conv2d):
        B = layer.lora_B[adapter]
        return layer.base_layer.groups == 1 and B.groups == 1 and tuple(B.stride) == (1, 1) \
            and tuple(B.padding) == (0, 0)
    return not getattr(layer, "fan_in_fan_out", False)


def install(model: torch.nn.Module, adapter: str) -> int:
    """Give the model's plain ``lora`` layers (one adapter, ``adapter``) the fused
    forward; -> how many."""
    count = 0
    for module in model.modules():
        if plain(module, adapter):
            module.__class__ = _FAST[type(module)]
            module.emotrain_adapter = adapter
            count += 1
    return count
