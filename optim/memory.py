"""Optimizer-state bytes, for the VRAM planner."""

from __future__ import annotations

import torch


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    else:
        # bitsandbytes keeps its quantisation state in small objects (QuantState etc.).
        inner = getattr(obj, "__dict__", None)
        if inner:
            yield from _tensors(inner)


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state``: sum of numel * element_size.

    Each tensor is counted once even when it is held twice or is a view of a storage
    already seen (flat buffers). Works for any torch optimizer (torch AdamW,
    bitsandbytes, Emo*) and on meta-device state, which is what ``init_state()`` builds
    for planning: sizes come from shapes, so nothing has to be allocated.
    """
    views: dict[int, set] = {}
    for st in optimizer.state.values():
        for t in _tensors(st):
            storage = t.untyped_storage()._cdata  # same id for every view of a storage
            views.setdefault(storage, set()).add(
                (t.storage_offset(), t.numel(), t.element_size()))
    total = 0
    for spans in views.values():
        # A span inside a larger span of the same storage is the same memory.
        spans = sorted(spans, key=lambda s: (s[0] * s[2], -s[1] * s[2]))
        end = -1
        for off, n, es in spans:
            lo, hi = off * es, (off + n) * es
            if hi <= end:
                continue
            total += hi - max(lo, end) if end > lo else hi - lo
            end = max(end, hi)
    return total
