"""From the command line's values to a training run: config, resume, then the loop."""

from __future__ import annotations

from .checkpoint import find_checkpoint, read_meta
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
    return train(resolve_config(preset, overrides))
