"""What each command does, once the command line is parsed."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import find_checkpoint, list_checkpoints, read_meta
from .config import config_from_dict, resolve_config
from .errors import UserError

# What a resumed run may change; anything else would make the checkpoint meaningless.
RESUMABLE_CHANGES = ("steps", "save_every", "keep_checkpoints", "output")


def resume_config(path: str, overrides: dict):
    ckpt = find_checkpoint(path)
    saved = config_from_dict(read_meta(ckpt)["config"])
    changed = {}
    for key, value in overrides.items():
        if value is None or value == getattr(saved, key):
            continue
        if key not in RESUMABLE_CHANGES:
            raise UserError(f"--{key.replace('_', '-')} differs from the checkpoint's ({getattr(saved, key)!r}): "
                            f"a resumed run keeps its config; only {', '.join(RESUMABLE_CHANGES)} may change")
        changed[key] = value
    values = {**saved.to_dict(), **changed}
    cfg = resolve_config(None, values)
    if cfg.steps < read_meta(ckpt)["step"]:
        raise UserError(f"--steps {cfg.steps} is below the checkpoint's step {read_meta(ckpt)['step']}: pass a larger --steps")
    return cfg, ckpt


def run_training(preset: str | None, overrides: dict, resume: str | None = None) -> dict:
    from .train import train

    if resume:
        if preset:
            raise UserError("--preset and --resume together: a resumed run takes its config from the checkpoint")
        cfg, ckpt = resume_config(resume, overrides)
        return train(cfg, resume=ckpt)
    cfg = resolve_config(preset, overrides)
    existing = list_checkpoints(Path(cfg.output).expanduser() / "checkpoints")
    if existing:  # a new run there would mix with (and prune) another run's checkpoints
        raise UserError(f"{cfg.output} already holds a run (checkpoint {existing[-1].name}): continue it with "
                        f"--resume {cfg.output}, or pass another --output")
    return train(cfg)


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
