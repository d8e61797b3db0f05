"""Will it fit? The planned peak against a card's memory, and the cheapest changes that
make a run fit, each planned the same way (plan.py).

The changes, cheapest first (what they cost the run):
1. gradient checkpointing on: slower steps, the same training;
2. a smaller optimizer state: EmoAiry (factored second moment) for the Emo family and
   the rest, AdamW8bit for AdamW; the shadow off;
3. a smaller batch with gradient accumulation keeping the effective batch: slower;
4. --fp8-base (with --mixed-precision bf16): the frozen UNet in float8, each layer cast
   to bf16 when it runs: a little slower, the base weights rounded to 3 mantissa bits;
5. no text-encoder training: a different LoRA;
6. a lower rank (halved, conv rank too): a smaller LoRA;
7. a lower resolution (768, then 512 px): less detail learned.
Each is planned alone, cheapest first, up to the first that fits; if none fits alone,
they are applied together in that order until the run fits. Each plan of new shapes
traces a step (about a CPU-minute for SDXL), cached after, so a change is first planned
without activations: what the step holds besides them (weights, state, copies; the
gradients left out, the backward may free activations before they all exist) plus the
cuBLAS workspaces is a floor under its peak, and a change whose floor already misses is
answered from it ("misses by at least"), untraced.
"""

from __future__ import annotations

from ..errors import UserError

GIB = 2**30


def gpu_memory_bytes(value: str) -> tuple[int, str]:
    """``--gpu-memory``: GiB (``12``, ``7.5``), or ``cuda`` / ``cuda:N`` for the total
    memory of that CUDA device here. -> (bytes, label)."""
    text = str(value).strip()
    if text.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UserError(f"--gpu-memory {text}: no CUDA device here; give the card's memory in GiB, e.g. 12")
        try:
            props = torch.cuda.get_device_properties(torch.device(text))
        except (RuntimeError, ValueError, AssertionError) as exc:
            raise UserError(f"--gpu-memory {text}: {exc}".splitlines()[0]) from None
        return int(props.total_memory), f"{props.name} ({props.total_memory / GIB:.1f} GiB)"
    try:
        gib = float(text)
    except ValueError:
        raise UserError(f"--gpu-memory must be a size in GiB (e.g. 12) or cuda[:N], got {text!r}") from None
    if not 0 < gib < 1e6:
        raise UserError(f"--gpu-memory must be a positive size in GiB below 1e6, got {text!r}")
    return int(gib * GIB), f"{gib:g} GiB"


def _ladder(cfg) -> list[tuple[str, dict]]:
    """(flags, config changes) for each cheaper setting, cheapest first."""
    steps = []
    if not cfg.gradient_checkpointing:
        steps.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    smaller = "adamw8bit" if cfg.optim == "adamw" else "emoairy"
    if cfg.optim not in (smaller, "adafactor") or cfg.shadow:
        flag = f"--optim {smaller}" + (" --no-shadow" if cfg.shadow else "")
        steps.append((flag, {"optim": smaller, "shadow": False}))
    if cfg.batch_size > 1:
        steps.append((f"--batch-size 1 --grad-accum {cfg.batch_size * cfg.grad_accum}",
                      {"batch_size": 1, "grad_accum": cfg.batch_size * cfg.grad_accum}))
    if not cfg.fp8_base and cfg.adapter != "dora":  # DoRA reads the base weight itself (config.py)
        steps.append(("--fp8-base" if cfg.mixed_precision == "bf16" else "--mixed-precision bf16 --fp8-base",
                      {"fp8_base": True, "mixed_precision": "bf16"}))
    if cfg.train_text_encoders:
        steps.append(("--no-train-text-encoders", {"train_text_encoders": False}))
    rank, conv = cfg.rank, cfg.effective_conv_rank
    for _ in range(2):
        if rank <= 4:
            break
        rank, conv = rank // 2, max(1, conv // 2) if conv else 0
        steps.append((f"--rank {rank}" + (f" --conv-rank {conv}" if conv else ""),
                      {"rank": rank, "conv_rank": conv}))
    for res in (768, 512):
        if cfg.resolution > res:
            steps.append((f"--resolution {res}", {"resolution": res}))
    return steps


def plan_run(cfg, activations: bool = True) -> dict:
    """The plan of the run ``cfg`` describes: its own optimizer and shadow setting."""
    from .plan import plan
    return plan(cfg, cfg.optim, cfg.shadow, activations=activations)


def _peak(plan_fn, cfg, budget: int) -> tuple[int, bool]:
    """-> (the planned peak of ``cfg``, False), or (a floor under it, True) when the
    floor alone misses ``budget``: the trace is then not needed to know the answer."""
    from .activations import CUDA_WORKSPACE_BYTES
    row = plan_fn(cfg, activations=False)["optimizers"][_row(cfg)]
    floor = row["training_step_bytes"] - row["grad_bytes"] + CUDA_WORKSPACE_BYTES
    if floor > budget:
        return floor, True
    return plan_fn(cfg)["optimizers"][_row(cfg)]["peak_bytes"], False


def _row(cfg) -> str:
    from .plan import row_key
    return row_key(cfg.optim, cfg.shadow)


def verdict(peak: int, budget: int, floor: bool = False) -> dict:
    """``floor``: ``peak`` is a floor under the peak (never fits; misses by at least)."""
    spare = budget - peak
    if floor:
        return {"fits": False, "spare_bytes": spare, "floor": True,
                "text": f"misses by at least {-spare / GIB:.1f} GiB"}
    return {"fits": spare >= 0, "spare_bytes": spare,
            "text": (f"fits with {spare / GIB:.1f} GiB to spare" if spare >= 0
                     else f"misses by {-spare / GIB:.1f} GiB")}


def fit(cfg, budget: int, peak: int, plan_fn=plan_run) -> dict:
    """The verdict for ``cfg`` (planned peak ``peak``) on ``budget`` bytes and, when it
    misses, the changes: each alone, cheapest first, up to the first that fits; if none
    does, together (cheapest first) until it fits. ``plan_fn(cfg, activations=True)``
    plans a changed run (``plan_run``). A change whose floor (``_peak``) misses is
    reported with ``"floor": True`` and that floor as its ``peak_bytes``."""
    out = {"budget_bytes": budget, "peak_bytes": peak, **verdict(peak, budget), "changes": [], "together": None}
    if out["fits"]:
        return out
    for flags, change in _ladder(cfg):
        p, floor = _peak(plan_fn, cfg.replace(**change), budget)
        out["changes"].append({"flags": flags, "peak_bytes": p, **verdict(p, budget, floor)})
        if p <= budget:  # the cheapest change that fits alone: the dearer ones are not needed
            return out
    applied, current = [], cfg
    for flags, change in _ladder(cfg):
        current = current.replace(**change)
        # a later step of the same setting (rank 4 after rank 8, 512 px after 768) replaces it
        applied = [(f, c) for f, c in applied if not set(c) <= set(change)] + [(flags, change)]
        p, floor = _peak(plan_fn, current, budget)
        out["together"] = {"flags": " ".join(f for f, _ in applied), "peak_bytes": p, **verdict(p, budget, floor)}
        if p <= budget:
            break
    return out


def format_fit(f: dict, label: str) -> str:
    lines = [f"On {label}: {f['text']} (planned peak {f['peak_bytes'] / GIB:.2f} GiB)."]
    if f["fits"]:
        return "\n".join(lines) + "\n"
    if f["changes"]:
        lines.append("Changes, cheapest first (each alone, up to the first that fits):")
        for c in f["changes"]:
            size = ("> " if c.get("floor") else "") + f"{c['peak_bytes'] / GIB:.2f}"
            lines.append(f"  {c['flags']:42s} {size:>8s} GiB  {c['text']}")
    t = f["together"]
    if t:
        size = ("> " if t.get("floor") else "") + f"{t['peak_bytes'] / GIB:.2f}"
        lines.append(f"Together: {t['flags']}: {size} GiB, {t['text']}.")
    if not any(c["fits"] for c in f["changes"]) and not (t and t["fits"]):
        lines.append("No change here makes it fit: a card with more memory is needed.")
    if any(c.get("floor") for c in f["changes"]) or (t and t.get("floor")):
        lines.append("'> X GiB': what the step holds besides its activations already misses; not traced.")
    return "\n".join(lines) + "\n"
