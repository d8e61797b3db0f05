"""``emotrain vram``: the memory plan (and, with ``--measure``, real steps) of the run a
preset and flags describe, per optimizer."""

from __future__ import annotations

import json
import sys

from ..config import given_values, resolve_config
from ..errors import UserError


def run_vram(preset: str | None, overrides: dict, *, both: bool = False, as_json: bool = False,
             measure: bool = False, measure_steps: int = 3, gpu_memory: str | None = None) -> str:
    """The memory plan of the run the preset and flags describe. ``--optim`` may name
    several optimizers (or ``all``) and ``--both`` asks for shadow off and on: a
    comparison table. Named nowhere (no preset, no flag), the optimizer and shadow
    default to all of them. ``gpu_memory`` (GiB, or cuda[:N]): the verdict for each row
    and, for the run's own optimizer, the cheapest changes that make it fit."""
    optim = overrides.pop("optim", None)
    several = optim is not None and ("," in optim or optim == "all")
    given = given_values(preset, {**overrides, "optim": None if several else optim})
    cfg = resolve_config(preset, {**overrides, "optim": None if several else optim}, needs_data=False,
                         defaults={"model": "sdxl"})
    optims = optim if several else (cfg.optim if "optim" in given else "all")
    # A named optimizer plans the run as configured; none named, the comparison table.
    shadow = "both" if both or not ({"optim", "shadow"} & set(given)) else cfg.shadow
    if measure and gpu_memory is not None:
        raise UserError("--gpu-memory judges the plan: run it without --measure")
    if measure_steps < 1:
        raise UserError("--measure-steps must be at least 1")
    from .. import vram

    if measure:
        if cfg.model == "sdxl" and not _has_gpu():
            print("no GPU: measuring the tiny model at 64 px instead (on a GPU, --model sdxl measures real-size "
                  "SDXL with random weights)", file=sys.stderr)
            cfg = cfg.replace(model="tiny", resolution=64)
        from ..watch.progress import TrainProgress
        result = vram.measure(cfg, optims, shadow, steps=measure_steps, progress=TrainProgress(0, every=10))
        return json.dumps(result, indent=2) if as_json else vram.format_measure(result)
    budget = vram.gpu_memory_bytes(gpu_memory) if gpu_memory is not None else None
    result = vram.plan(cfg, optims, shadow)
    fit_text = ""
    if budget is not None and not result.get("activations"):
        raise UserError(f"--gpu-memory: {result.get('activations_untraced') or 'the plan has no activation figure'}, "
                        "so no verdict can be given: drop --gpu-memory")
    if budget is not None:
        size, label = budget
        for row in result["optimizers"].values():
            row["fit"] = vram.verdict(row["peak_bytes"], size)
        own = vram.row_key(cfg.optim, cfg.shadow)
        peak = result["optimizers"][own]["peak_bytes"] if own in result["optimizers"] \
            else vram.plan_run(cfg)["optimizers"][own]["peak_bytes"]
        result["gpu_memory"] = {"label": label, **vram.fit(cfg, size, peak),
                                "optimizer": own}
        fit_text = vram.format_fit(result["gpu_memory"], f"{label}, {vram.row_label(cfg.optim, cfg.shadow)}")
    return json.dumps(result, indent=2) if as_json else vram.format_table(result) + fit_text


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()
