"""Validation, samples and logging options: what can be known before a model is loaded.
Pure Python (config.validate calls it before torch is imported)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .prompts import read_prompt_file, sample_prompts


def check_samplers_for(cfg, zero_terminal_snr: bool) -> None:
    """A zero-terminal-SNR schedule is sampled only by schedulers that honour it."""
    from ..errors import UserError
    from ..samplers import without_zero_snr

    if not zero_terminal_snr:
        return
    unfit = without_zero_snr([cfg.sample_sampler, *(p.sampler for p in sample_prompts(cfg))]
                             if cfg.sample_prompts or cfg.sample_prompt else [])
    if unfit:
        raise UserError(f"sample_sampler: {', '.join(unfit)} cannot sample a zero-terminal-SNR model: use euler, "
                        "euler_a, ddim, dpm++2m or unipc")


def check_watch_options(cfg, bad) -> None:
    if cfg.val_data and cfg.val_split:
        bad("val_split", "--val-data and --val-split both given: validate on a folder or on held-out images, not both")
    if cfg.val_data and cfg.val_data != "demo" and not Path(cfg.val_data).expanduser().is_dir():
        what = "is a file" if Path(cfg.val_data).expanduser().exists() else "does not exist"
        bad("val_data", f"folder {cfg.val_data} {what}: pass an existing folder of images, or 'demo'")
    if cfg.val_every is not None and not (cfg.val_data or cfg.val_split):
        bad("val_every", "no validation images: add --val-data DIR or --val-split F (e.g. 0.1)")
    if cfg.sample_prompts and not read_prompt_file(cfg.sample_prompts):
        bad("sample_prompts", f"{cfg.sample_prompts} holds no prompt: write one prompt a line")
    sample_prompts(cfg)  # every line checked now, not at the first sample
    if cfg.sample_every is not None and not (cfg.sample_prompts or cfg.sample_prompt):
        bad("sample_every", "no prompts to sample: add --sample-prompt \"...\" or --sample-prompts FILE")
    if cfg.log_with != "none":
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[cfg.log_with]
        if importlib.util.find_spec(module) is None:
            bad("log_with", f"{cfg.log_with} is not installed: pip install {module}, or pass --log-with none")
