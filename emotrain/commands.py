"""What each command does, once the command line is parsed."""

from __future__ import annotations

import json

from .checkpoint import find_checkpoint, list_checkpoints, read_meta
from .config import config_from_dict, given_values, resolve_config, resumed_config
from .errors import UserError
from .layout import RunFolder


def resume_config(path: str, overrides: dict):
    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    cfg = resumed_config(config_from_dict(meta["config"]), overrides)
    if cfg.steps < meta["step"]:
        raise UserError(f"--steps {cfg.steps} is below the checkpoint's step {meta['step']}: pass a larger --steps")
    return cfg, ckpt


def run_training(preset: str | None, overrides: dict, resume: str | None = None) -> dict:
    """Check everything the command line says, then train (torch is imported only then)."""
    if resume:
        if preset:
            raise UserError("--preset and --resume together: a resumed run takes its config from the checkpoint")
        cfg, ckpt = resume_config(resume, overrides)
        from .train import train
        return train(cfg, resume=ckpt)
    cfg = resolve_config(preset, overrides)
    existing = list_checkpoints(RunFolder(cfg.output).checkpoints)
    if existing:  # a new run there would mix with (and prune) another run's checkpoints
        raise UserError(f"{cfg.output} already holds a run (checkpoint {existing[-1].name}): continue it with "
                        f"--resume {cfg.output}, or pass another --output")
    from .train import train
    return train(cfg)


def run_vram(preset: str | None, overrides: dict, *, both: bool = False, as_json: bool = False,
             measure: bool = False, measure_steps: int = 3) -> str:
    """The memory plan of the run the preset and flags describe. ``--optim`` may name
    several optimizers (or ``all``) and ``--both`` asks for shadow off and on: a
    comparison table. Named nowhere (no preset, no flag), the optimizer and shadow
    default to all of them."""
    import sys

    optim = overrides.pop("optim", None)
    several = optim is not None and ("," in optim or optim == "all")
    given = given_values(preset, {**overrides, "optim": None if several else optim})
    cfg = resolve_config(preset, {**overrides, "optim": None if several else optim}, needs_data=False,
                         defaults={"model": "sdxl"})
    optims = optim if several else (cfg.optim if "optim" in given else "all")
    # A named optimizer plans the run as configured; none named, the comparison table.
    shadow = "both" if both or not ({"optim", "shadow"} & set(given)) else cfg.shadow
    if measure_steps < 1:
        raise UserError("--measure-steps must be at least 1")
    from . import vram

    if measure:
        if cfg.model == "sdxl" and not _has_gpu():
            print("no GPU: measuring the tiny model at 64 px instead (on a GPU, --model sdxl measures real-size "
                  "SDXL with random weights)", file=sys.stderr)
            cfg = cfg.replace(model="tiny", resolution=64)
        result = vram.measure(cfg, optims, shadow, steps=measure_steps)
        return json.dumps(result, indent=2) if as_json else vram.format_measure(result)
    result = vram.plan(cfg, optims, shadow)
    return json.dumps(result, indent=2) if as_json else vram.format_table(result)


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def run_merge(loras: list[str], output: str, model: str | None = None, rank: int | None = None,
              conv_rank: int | None = None, to: str = "kohya") -> str:
    """With a model: bake the weighted LoRAs into it and write a diffusers SDXL folder.
    Without: combine them into one LoRA file (exactly, or by SVD to ``rank``)."""
    from .formats import save_lora_file
    from .stacking import combine, load_weighted, save_merged_pipeline

    if not loras:
        raise UserError("no LoRA given: pass --lora FILE[:WEIGHT] at least once")
    weighted = load_weighted(loras)
    if model:
        if rank is not None:
            raise UserError("--rank applies when combining LoRAs into one file, not when merging into a model: drop one")
        folder = save_merged_pipeline(model, weighted, output)
        return f"wrote merged SDXL model to {folder} (loads with StableDiffusionXLPipeline.from_pretrained)"
    combined, report = combine(weighted, rank=rank, conv_rank=conv_rank)
    path = save_lora_file(output, combined, format=to)
    return f"wrote {path}: {report.summary()}"


def run_convert(src: str, dst: str, to: str) -> str:
    from .formats import convert
    return f"wrote {convert(src, dst, to=to)}"


def run_report(folders: list[str], out: str | None = None) -> str:
    """report.html of one run, of a sweep (its folder) or of several runs overlaid."""
    from pathlib import Path

    from .watch.report import write_report

    if len(folders) == 1 and RunFolder(folders[0]).sweep_json.is_file():
        sweep = RunFolder(folders[0])
        names = [r["name"] for r in json.loads(sweep.sweep_json.read_text())["runs"]]
        runs = [sweep.root / n for n in names if (sweep.root / n).is_dir()]
        if not runs:
            raise UserError(f"sweep {sweep.root} has no run folder yet: run the sweep first")
        path = write_report(runs, out or sweep.report, title=f"emotrain sweep {sweep.root.name}")
    else:
        for folder in folders:
            if not Path(folder).expanduser().is_dir():
                raise UserError(f"run folder {folder} does not exist: pass the --output folder of a run")
        default = RunFolder(folders[0]).report if len(folders) == 1 else Path("report.html")
        path = write_report(folders, out or default)
    return f"wrote {path}"
