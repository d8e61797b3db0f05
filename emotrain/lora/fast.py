"""The ``lora`` kind's forward under mixed precision, in fewer operations than peft's.

peft computes a LoRA layer under autocast as: the base layer; the input cast to fp32 (the
adapter's dtype); autocast casting it back, and the two factors, to bf16 for each matrix
product; an identity dropout; the product scaled (one pass over the output) and added
(another). Each of those is an operation on the activation, and autograd adds as many
again in the backward: on SDXL about two thirds of a step's operations were the
adapters'. Here one autograd function per layer computes, in the autocast dtype,

    y = x W^T + b,   h = x a^T,   out = y + h b_s^T     (one ``addmm``: the sum fused)

where ``a`` and ``b_s = scale * B`` are low-precision copies of the fp32 factors kept for
the whole model (``Shadows``): refreshed, with the scale folded in, by two foreach
operations for all layers together whenever a factor has changed (an optimizer step, a
load), at the first forward that needs them; never per layer. The backward issues four
matrix products per layer (input, hidden and the two factors' gradients, the scale of B's
gradient in its ``addmm``'s ``alpha``) and writes the gradients of the fp32 factors in
fp32 (the master weights stay fp32): on CUDA straight from the product (``out_dtype``),
elsewhere through one cast each. 3x3 convolutions (LoCon) do the same with convolutions
and one ``add``. Without autocast (fp32 runs) the layer runs peft's own forward, unchanged
bit for bit. A base layer stored in float8
(``--fp8-base``, sdxl/fp8.py) is cast to the compute dtype where it is used, in the
forward and again in the backward, one layer at a time.

``install(model, adapter)`` swaps the classes of the model's plain ``lora`` layers (one adapter,
no dropout, no bias on B, no variant) for the subclasses below and gives them one
``Shadows``; any other layer keeps peft's forward. The results equal peft's within bf16
rounding (tests/emotrain/lora/).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as peft_layer

from ..sdxl import stored_dtype

SHADOWS = "_emotrain_shadows"  # the layer attribute holding its model's Shadows


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype where autocast is on and lower than the adapter's, else None."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype != weight.dtype else None


def _factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    name = layer.emotrain_adapter
    return layer.lora_A[name].weight, layer.lora_B[name].weight


class Shadows:
    """Low-precision copies ``(a, scale * B)`` of the factors of every fast layer of one
    model, in one flat buffer. A layer's forward asks ``copies_of(layer, dtype)``: when a
    factor of that layer changed since the last refresh (its version counter: optimizer
    steps and loads write in place; its storage: a move), or its scale or dtype did, all copies are
    refreshed at once: one ``_foreach_copy_`` (the cast) and one ``_foreach_mul_`` (the
    scales). The copies hold no autograd history; the fast functions write the factors'
    gradients themselves. Memory: 2 bytes per adapter parameter (bf16), kept between steps
    (the per-layer casts they replace were alive from each forward to its backward)."""

    def __init__(self, layers: list):
        self.layers = layers
        for i, layer in enumerate(layers):
            layer.emotrain_index = i
        self.dtype, self.copies, self.seen = None, [], []

    def _state(self, layer) -> tuple:
        A, B = _factors(layer)  # in-place writes bump the versions; ``p.data = t`` changes the storage
        return (A._version, B._version, A.untyped_storage()._cdata, B.untyped_storage()._cdata,
                float(layer.scaling[layer.emotrain_adapter]))

    def copies_of(self, layer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        i = layer.emotrain_index
        if dtype != self.dtype or not self.seen or self.seen[i] != self._state(layer):
            self.refresh(dtype)
        return self.copies[2 * i], self.copies[2 * i + 1]

    @torch.no_grad()
    def refresh(self, dtype: torch.dtype) -> None:
        params = [p for layer in self.layers for p in _factors(layer)]
        devices = {p.device for p in params}
        if dtype != self.dtype or len(self.copies) != len(params) or len(devices) != 1 \
                or any(c.device != p.device or c.shape != p.shape or type(c) is not type(p.data)  # fake or real
                       for c, p in zip(self.copies, params)):
            if len(devices) == 1:  # one allocation, views per factor
                flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
                self.copies = [v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in params]), params)]
            else:
                self.copies = [torch.empty(p.shape, dtype=dtype, device=p.device) for p in params]
            self.dtype = dtype
        torch._foreach_copy_(self.copies, params)
        scales = [float(layer.scaling[layer.emotrain_adapter]) for layer in self.layers]
        if any(s != 1.0 for s in scales):
            torch._foreach_mul_(self.copies[1::2], scales)
        self.seen = [self._state(layer) for layer in self.layers]


_OUT_DTYPE = {"cuda": True}  # whether the device's matrix product writes fp32 from bf16 (checked on first use)


def _fp32_product(m1: torch.Tensor, m2: torch.Tensor, alpha: float = 1.0, master: torch.Tensor | None = None,
                  low: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * m1 @ m2`` in float32 from low-precision factors: one ``mm``/``addmm`` with
    ``out_dtype`` on CUDA (fp32 accumulation written as is), else the product and a cast.
    With ``alpha`` != 1, ``master`` and ``low`` are any tensors of the result's shape in
    float32 and in the factors' dtype: ``addmm``'s input, which ``beta=0`` ignores."""
    if _OUT_DTYPE.get(m1.device.type):
        try:
            if alpha == 1.0:
                return torch.mm(m1, m2, out_dtype=torch.float32)
            return torch.addmm(master, m1, m2, out_dtype=torch.float32, beta=0, alpha=alpha)
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE[m1.device.type] = False  # a build without it: the product and a cast, from now on
    if alpha == 1.0:
        return torch.mm(m1, m2).float()
    return torch.addmm(low, m1, m2, beta=0, alpha=alpha).float()


class _LinearLora(torch.autograd.Function):
    """``out = x W^T + bias + extra * (h * keep) b^T`` with ``h = x a^T`` and ``b = carried * B``:
    ``carried`` is the scale the copy ``b`` holds (the LoRA scale), ``extra`` another factor,
    ``keep`` a 0/1 mask on ``h`` that ``draw(h)`` returns
    (dropout.py; None: no mask). Three products forward, four back; a mask adds one
    multiply each way, ``extra`` rides on the products' ``alpha``."""

    @staticmethod
    def forward(ctx, x, A, B, layer, a, b, carried, extra=1.0, draw=None):
        base = layer.base_layer
        weight, bias = stored_dtype(base.weight, x.dtype), stored_dtype(base.bias, x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
        h = torch.mm(x2, a.t())
        keep = None if draw is None else draw(h.view(*x.shape[:-1], h.shape[-1]))
        if keep is not None:  # in place: h is nobody else's
            h.view(*x.shape[:-1], h.shape[-1]).mul_(keep)
        out = torch.addmm(y, h, b.t()) if extra == 1.0 else torch.addmm(y, h, b.t(), alpha=extra)
        ctx.save_for_backward(x2, h)
        ctx.layer, ctx.a, ctx.b, ctx.carried, ctx.extra, ctx.keep, ctx.shape = layer, a, b, carried, extra, keep, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, h = ctx.saved_tensors
        a, b, extra = ctx.a, ctx.b, ctx.extra
        g = grad.reshape(-1, grad.shape[-1])
        gh = torch.mm(g, b)  # d loss / d h over ``extra``, the carried scale included
        if ctx.keep is not None:
            gh.view(*ctx.shape[:-1], gh.shape[-1]).mul_(ctx.keep)
        gx = gA = gB = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(g, stored_dtype(ctx.layer.base_layer.weight, g.dtype))
            gx = (torch.addmm(gx, gh, a) if extra == 1.0 else torch.addmm(gx, gh, a, alpha=extra)).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            gA = _fp32_product(gh.t(), x2) if extra == 1.0 else \
                _fp32_product(gh.t(), x2, extra, _factors(ctx.layer)[0], a)
        if ctx.needs_input_grad[2]:
            gB = _fp32_product(g.t(), h, ctx.carried * extra, _factors(ctx.layer)[1], b)
        return gx, gA, gB, None, None, None, None, None, None


def _conv_args(conv) -> tuple:
    return conv.stride, conv.padding, conv.dilation, conv.groups


class _ConvLora(torch.autograd.Function):
    """The same for a convolution: ``h = conv(x, a)``, ``out = conv(x, W) + extra * conv(h * keep, b)``."""

    @staticmethod
    def forward(ctx, x, A, B, layer, a, b, carried, extra=1.0, draw=None):
        base, down = layer.base_layer, layer.lora_A[layer.emotrain_adapter]
        y = F.conv2d(x, stored_dtype(base.weight, x.dtype), stored_dtype(base.bias, x.dtype), *_conv_args(base))
        h = F.conv2d(x, a, None, *_conv_args(down))
        keep = None if draw is None else draw(h)
        if keep is not None:
            h.mul_(keep)
        out = torch.add(y, F.conv2d(h, b)) if extra == 1.0 else torch.add(y, F.conv2d(h, b), alpha=extra)
        ctx.save_for_backward(x, h)
        ctx.layer, ctx.a, ctx.b, ctx.carried, ctx.extra, ctx.keep = layer, a, b, carried, extra, keep
        return out

    @staticmethod
    def backward(ctx, grad):
        x, h = ctx.saved_tensors
        layer, a, b, extra = ctx.layer, ctx.a, ctx.b, ctx.extra
        base, down = layer.base_layer, layer.lora_A[layer.emotrain_adapter]
        backward = torch.ops.aten.convolution_backward
        gh, gB, _ = backward(grad, h, b, None, (1, 1), (0, 0), (1, 1), False, (0, 0), 1,
                             [True, ctx.needs_input_grad[2], False])
        if ctx.keep is not None:
            gh.mul_(ctx.keep)
        stride, padding, dilation, groups = _conv_args(down)
        gx, gA, _ = backward(gh, x, a, None, stride, padding, dilation, False, (0, 0), groups,
                             [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        if gx is not None:
            stride, padding, dilation, groups = _conv_args(base)
            base_gx = backward(grad, x, stored_dtype(base.weight, grad.dtype), None, stride, padding, dilation, False,
                               (0, 0), groups, [True, False, False])[0]
            gx = gx + base_gx if extra == 1.0 else torch.add(base_gx, gx, alpha=extra)
        if gA is not None:
            gA = gA.float() if extra == 1.0 else gA.float().mul_(extra)
        if gB is not None:  # the gradient of B itself: the scale b carries, once more
            factor = ctx.carried * extra
            gB = gB.float() if factor == 1.0 else gB.float().mul_(factor)
        return gx, gA, gB, None, None, None, None, None, None


class _Fast:
    """Mixed into peft's layer classes: the fused forward under autocast."""

    emotrain_adapter: str  # the layer's one adapter (``install`` sets it)

    def forward(self, x, *args, **kwargs):
        if args or kwargs:
            return super().forward(x, *args, **kwargs)
        out = self.fused(x)
        return super().forward(x) if out is None else out

    def fused(self, x, draw=None, extra: float = 1.0):
        """The fused forward under autocast, or None where it does not apply (no autocast:
        peft's forward is the fp32 reference, bit for bit; adapters off or merged; base
        trained). ``draw(h)``: a 0/1 mask for ``h`` or None, ``extra`` a factor on the
        LoRA's output (dropout.py: 1/(1-p)); see ``_LinearLora``."""
        name = self.emotrain_adapter
        A = self.lora_A[name].weight
        dtype = _compute_dtype(x, A)
        if dtype is None or self.disable_adapters or self.merged or list(self.active_adapters) != [name] \
                or self.base_layer.weight.requires_grad:
            return None
        a, b = getattr(self, SHADOWS).copies_of(self, dtype)
        x = x if x.dtype == dtype else x.to(dtype)
        return self._function.apply(x, A, self.lora_B[name].weight, self, a, b, float(self.scaling[name]), extra, draw)


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
    forward and one ``Shadows`` for them all; -> how many."""
    layers = []
    for module in model.modules():
        if plain(module, adapter):
            module.__class__ = _FAST[type(module)]
            module.emotrain_adapter = adapter
            layers.append(module)
    _share_shadows(layers)
    return len(layers)


def copy_bytes(model: torch.nn.Module, mixed_precision: str) -> int:
    """Bytes of the ``Shadows`` of ``model``'s fused layers in a run at ``mixed_precision``:
    2 per factor value under bf16/fp16 (the copies exist only under autocast), else 0."""
    if mixed_precision not in ("bf16", "fp16"):
        return 0
    return 2 * sum(p.numel() for m in model.modules() if isinstance(m, _Fast) for p in _factors(m))


def _share_shadows(layers: list) -> None:
    shadows = Shadows(layers)
    for layer in layers:
        setattr(layer, SHADOWS, shadows)


def uninstall(model: torch.nn.Module, inside: list) -> int:
    """peft's own forward back on the fast layers within the modules ``inside`` (what
    torch.compile traces: its compiled kernels fuse the casts and the scale, where the
    fused function's Python would break the graph at each layer); the model's other fast
    layers keep theirs and one ``Shadows``; -> how many went back."""
    peft_class = {fast: peft for peft, fast in _FAST.items()}
    count = 0
    for module in inside:
        for layer in module.modules():
            if isinstance(layer, _Fast):
                layer.__class__ = peft_class[type(layer)]
                delattr(layer, SHADOWS)
                count += 1
    _share_shadows([m for m in model.modules() if isinstance(m, _Fast)])
    return count
