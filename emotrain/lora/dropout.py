"""LoRA dropout as sd-scripts defines it (networks/lora.py, ``LoRAModule.forward``), for
the ``lora`` kind, on training micro-batches only.

For a layer ``y = W x + s * B(A(x))`` (``A`` the down projection, ``B`` the up one,
``s = alpha / rank``):

- ``--module-dropout p``: with probability p the layer is ``W x`` alone for the micro-batch
  (one draw per layer and micro-batch).
- ``--network-dropout p``: ``h = A(x)`` is dropped element-wise (each of its rank neurons
  at each position), the kept ones multiplied by ``1/(1-p)`` (``torch.nn.functional.dropout``).
- ``--rank-dropout p``: per sample, each rank is kept where a uniform draw is above p
  (one mask of shape (batch, rank), shared by every position of the sample); the scale
  becomes ``s / (1-p)``, as if the rank had shrunk.

Network dropout comes first, then the rank mask, as in sd-scripts; the two masks are
multiplied into one mask when both are on; their ``1/(1-p)`` factors are applied once (the
same product, fewer operations on the activation). The masks of a micro-batch are slices
of a few large draws (``Dropout._take``), not one draw per layer. Under autocast a layer
with fast.py's fused forward (every plain LoRA layer training installs) computes the
dropped LoRA in it: 0/1 masks, one multiply of ``h`` forward and one of its gradient back,
the factors riding on the products' ``alpha``. In fp32 peft's layers run as autograd sees
them, the mask holding 0 or ``scale/((1-p)(1-q))``: its multiply takes the place of peft's
multiply by the scale. Validation, samples,
``emotrain vram`` and every forward outside ``Dropout.micro_batch`` see the plain LoRA.

The draws come from the run's noise generator, never the global RNG: at each micro-batch
one seed is drawn from it, and every mask of the micro-batch comes from generators seeded
from that draw (module choices on the CPU, masks on the layer's device). A checkpoint
holds the generator's state, so a resumed run draws the same masks. A layer called again
within the micro-batch with the same input shape (the recomputation of gradient
checkpointing) reuses its masks.

``install`` is called only when an option is above 0: without them no layer changes class
and no operation is added. The layers keep their own forward (fast.py's or peft's) for
everything the options leave alone: a module kept by module dropout, with neither other
dropout on, runs it unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.lora import layer as peft_layer

from ..errors import UserError
from . import fast

CHUNK, CHUNK_CAP = 64, 1 << 22  # a mask draw covers 64 requests of the size that started it, at most 4M values


class Dropout:
    """The run's dropout settings and the state of the micro-batch being drawn."""

    def __init__(self, network: float, rank: float, module: float, layers: list):
        self.network, self.rank, self.module, self.layers = network, rank, module, layers
        self.token = None  # set within a training micro-batch only
        self._seed, self._count, self._generators, self._skips, self._pools = 0, 0, {}, None, {}
        self.drawn: dict[int, tuple] = {}  # layer index -> (h's shape, h mask, rank mask, their product)

    @contextmanager
    def micro_batch(self, noise: torch.Generator):
        """Dropout on for one micro-batch's forward and backward; its draws seeded from
        ``noise`` (one draw)."""
        self._seed = int(torch.randint(0, 2**62, (1,), generator=noise))
        self._count += 1
        self.token = self._count
        self._generators, self._pools = {}, {}
        self._skips = (torch.rand(len(self.layers), generator=self._generator(torch.device("cpu"), 1))
                       < self.module).tolist() if self.module else None
        try:
            yield
        finally:
            self.token, self._skips, self._pools = None, None, {}
            self.drawn.clear()

    def _generator(self, device: torch.device, stream: int) -> torch.Generator:
        key = (str(device), stream)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device).manual_seed((self._seed + 7919 * stream) % 2**63)
        return self._generators[key]

    def skipped(self, index: int) -> bool:
        """Whether module dropout leaves the ``index``-th layer out of this micro-batch."""
        return self._skips is not None and self._skips[index]

    def masks(self, layer, h: torch.Tensor, conv: bool, value: float = 1.0) -> tuple:
        """(h mask or None, rank mask or None, their product) of ``layer`` in this
        micro-batch: 0 where dropped, ``value`` where kept (the first mask carries it, the
        second holds 1)."""
        cached = self.drawn.get(layer.emotrain_dropout_index)
        if cached is not None and cached[0] == h.shape:
            return cached[1:]
        keep_h = keep_rank = None
        if self.network:
            keep_h = self._take(h.numel(), self.network, 2, h, value).view(h.shape)
        if self.rank:  # one draw per sample and rank: (batch, rank, 1, 1) of a conv, (batch, 1.., rank) else
            ones = (1,) * (h.dim() - 2)  # the positions share the draw
            shape = (h.shape[0], h.shape[1], *ones) if conv else (h.shape[0], *ones, h.shape[-1])
            n = shape[0] * shape[1 if conv else -1]
            keep_rank = self._take(n, self.rank, 3, h, 1.0 if self.network else value).view(shape)
        keep = keep_rank if keep_h is None else keep_h if keep_rank is None else keep_h * keep_rank
        self.drawn[layer.emotrain_dropout_index] = (h.shape, keep_h, keep_rank, keep)
        return keep_h, keep_rank, keep

    def _take(self, n: int, p: float, stream: int, like: torch.Tensor, value: float) -> torch.Tensor:
        """The next ``n`` values of the micro-batch's stream ``stream`` on ``like``'s device
        and dtype: ``value`` with probability 1-p, else 0. Drawn in chunks of about ``CHUNK``
        requests (three operations for many layers: the draw, ``value`` multiplied in), so a
        layer's mask is a slice of one draw. Which values a layer gets depends only on the
        micro-batch's seed and the requests its layers made before it, in order: the same in
        a resumed run."""
        key = (like.device, like.dtype, stream, value)
        pool, used = self._pools.get(key, (None, 0))
        if pool is None or used + n > pool.numel():
            pool = torch.empty(max(n, min(CHUNK * n, CHUNK_CAP)), dtype=like.dtype, device=like.device)
            pool.bernoulli_(1 - p, generator=self._generator(like.device, stream))
            if value != 1.0:
                pool.mul_(value)
            used = 0
        self._pools[key] = (pool, used + n)
        return pool[used:used + n]

    def scale(self) -> float:
        """The factor the kept neurons are scaled by: 1/(1-p) of each dropout."""
        return 1 / ((1 - self.network) * (1 - self.rank))


class _WithDropout:
    """Mixed in before a layer's own class: sd-scripts' dropout within a micro-batch."""

    emotrain_dropout: Dropout
    emotrain_dropout_index: int
    emotrain_dropout_adapter: str

    def forward(self, x, *args, **kwargs):
        drop = self.emotrain_dropout
        if drop.token is None or args or kwargs or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        if drop.skipped(self.emotrain_dropout_index):
            return self.base_layer(x)  # module dropout: the frozen layer alone
        if not (drop.network or drop.rank):
            return super().forward(x, *args, **kwargs)
        conv = isinstance(self, peft_layer.Conv2d)
        autocast = torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
        if autocast and isinstance(self, fast._Fast):  # one multiply of h and one of its gradient
            out = self.fused(x, draw=lambda h: drop.masks(self, h, conv)[2], extra=drop.scale())
            if out is not None:
                return out
        name = self.emotrain_dropout_adapter  # peft's layers, as autograd sees them
        down, up = self.lora_A[name], self.lora_B[name]
        result = self.base_layer(x)
        h = down(x if autocast else x.to(down.weight.dtype))
        # the LoRA's scale and the dropouts' 1/(1-p) ride on the mask: one multiply, as peft's scale
        h = h * drop.masks(self, h, conv, self.scaling[name] * drop.scale())[2]
        lora = up(h)
        return result + (lora if lora.dtype == result.dtype else lora.to(result.dtype))


_CLASSES: dict[type, type] = {}


def _with_dropout(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Dropout{cls.__name__}", (_WithDropout, cls), {})
    return _CLASSES[cls]


def _plain_lora(layer) -> str | None:
    """The adapter name of a plain LoRA layer (one adapter, no variant such as DoRA)."""
    if not isinstance(layer, (peft_layer.Linear, peft_layer.Conv2d)) or len(layer.lora_A) != 1:
        return None
    return None if layer.lora_variant else next(iter(layer.lora_A))


def install(models: list, network: float, rank: float, module: float) -> Dropout | None:
    """Dropout on every LoRA layer of ``models``; None (and nothing changed) when all
    three probabilities are 0. Any adapter other than plain LoRA is refused."""
    if not (network or rank or module):
        return None
    layers = []
    for model in models:
        for layer in model.modules():
            if isinstance(layer, peft_layer.LoraLayer) and hasattr(layer, "base_layer"):
                name = _plain_lora(layer)
                if name is None:
                    raise UserError(f"--network-dropout, --rank-dropout and --module-dropout apply to plain LoRA "
                                    f"layers only, and {type(layer).__name__} is not one: drop them")
                layer.__class__ = _with_dropout(type(layer))
                layer.emotrain_dropout_adapter, layer.emotrain_dropout_index = name, len(layers)
                layers.append(layer)
    drop = Dropout(network, rank, module, layers)
    for layer in layers:
        layer.emotrain_dropout = drop
    return drop
