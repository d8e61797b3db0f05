"""Will the run fit its GPU? Checked before the model loads, and recorded beside what the
run then measured.

Contract:
- ``check(cfg)`` runs on CUDA (each process against its own device, ``cuda:LOCAL_RANK``)
  unless --no-memory-check: it makes the plan `emotrain vram` makes for the same flags
  (vram.plan, the run's optimizer and shadow: ``planned_peak_bytes`` is that row's
  ``peak_bytes``) and compares it with the device's free memory
  (``torch.cuda.mem_get_info``). Too little: a ``UserError`` (one line, exit 2) naming
  the shortfall, the cheapest changes that fit (vram.fit, the ``--gpu-memory`` verdict)
  and --no-memory-check. Nothing is written and no weight is loaded before it.
- On CPU there is no check and no plan (its figures are a GPU's, and tracing a step
  costs CPU-seconds to a CPU-minute per new shape set): ``planned_peak_bytes`` is null.
- ``EMOTRAIN_FAKE_FREE_MEMORY_MIB``: the free memory, in MiB, the check believes the
  device has, read here only (tests, and trying a card's size on another machine); with
  it set the check also runs on CPU.
- A plan that cannot be made (an adapter without an activation trace: loha, lokr) is
  said in one note and the run goes on unchecked.
- ``record(...)`` is run.json's ``memory``: the plan's figures beside the measured peak
  (``torch.cuda.max_memory_allocated`` on CUDA, null on CPU) and the measured breakdown
  (record.memory_report).
"""

from __future__ import annotations

import os

FAKE_FREE = "EMOTRAIN_FAKE_FREE_MEMORY_MIB"
MIB, GIB = 2**20, 2**30


def size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def local_device() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def free_memory() -> tuple[int, str] | None:
    """(free bytes, label) of the device this process trains on; None on CPU."""
    fake = os.environ.get(FAKE_FREE)
    if fake:
        from ..errors import UserError
        try:
            mib = float(fake)
        except ValueError:
            raise UserError(f"{FAKE_FREE} must be a number of MiB, got {fake!r}: fix or unset it") from None
        return int(mib * MIB), f"{mib:g} MiB free ({FAKE_FREE})"
    import torch
    if not torch.cuda.is_available():
        return None
    index = local_device()
    free, total = torch.cuda.mem_get_info(index)
    name = torch.cuda.get_device_name(index)
    return free, f"cuda:{index} ({name}: {free / GIB:.1f} of {total / GIB:.1f} GiB free)"


def _fixes(cfg, budget: int, peak: int) -> str:
    """The --gpu-memory verdict's changes that fit, in a few words."""
    from .. import vram
    f = vram.fit(cfg, budget, peak)
    fits = [c for c in f["changes"] if c["fits"]]
    if fits:
        return "; ".join(f"{c['flags']} (planned {size(c['peak_bytes'])})" for c in fits)
    t = f["together"]
    if t and t["fits"]:
        return f"together {t['flags']} (planned {size(t['peak_bytes'])})"
    return "none of emotrain's changes is enough: free the GPU or use one with more memory"


def check(cfg) -> tuple[dict, str | None]:
    """-> (the plan's part of run.json's ``memory``, a note to print or None); raises
    ``UserError`` when the run will not fit."""
    from ..errors import UserError
    memory = {"planned_peak_bytes": None, "measured_peak_bytes": None}
    if not cfg.memory_check:
        return {**memory, "plan": "not made: --no-memory-check"}, \
            "note: --no-memory-check: the planned peak is not compared with the GPU's free memory"
    free = free_memory()
    if free is None:
        return {**memory, "plan": "not made: no CUDA device (the memory check is for GPUs)"}, None
    budget, label = free
    from .. import vram
    plan = vram.plan_run(cfg)
    row = plan["optimizers"][vram.row_key(cfg.optim, cfg.shadow)]
    if "peak_bytes" not in row:
        why = plan.get("activations_untraced") or "no activation figure"
        return ({**memory, "plan": f"not made: {why}"},
                f"note: the memory check is skipped: {why.split(';')[0]}; the run goes on unchecked")
    peak = row["peak_bytes"]
    memory.update(planned_peak_bytes=peak, planned={k: row[k] for k in (
        "lora_param_bytes", "grad_bytes", "state_bytes", "training_step_bytes", "activation_bytes", "margin_bytes")},
        plan="vram.plan (emotrain vram with the same flags)", free_bytes=budget, device=label)
    if peak > budget:
        raise UserError(f"will not fit: planned peak {size(peak)}, {label}: short by {size(peak - budget)}; "
                        f"cheapest fix: {_fixes(cfg, budget, peak)}; or --no-memory-check to try anyway")
    return memory, (f"memory: planned peak {size(peak)}, {label}: fits with {size(budget - peak)} to spare")


def measured_peak(device) -> int | None:
    """The allocator's peak on CUDA (``max_memory_allocated``); None elsewhere."""
    import torch
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def record(planned: dict, device, measured: dict | None = None) -> dict:
    """run.json's ``memory``: the plan's figures, the measured peak and, at the end of a
    run, the measured breakdown (record.memory_report)."""
    return {**planned, **(measured or {}), "measured_peak_bytes": measured_peak(device)}
