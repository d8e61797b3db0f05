"""A finished (or stopped) run folder, read back for the report: run.json, every step's
scalars from metrics.jsonl, the sample images and their prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..disk.layout import SAMPLE_NAME, RunFolder
from ..optimizers import DISPLAY
from .logs import read_metrics

# What must match for two validation losses to be comparable, with how to say it.
VALIDATION_KEYS = {"data": "training data", "images_sha256": "validation images", "seed": "seed (noise)",
                   "timesteps": "validation timesteps", "model": "model", "resolution": "resolution",
                   "min_snr_gamma": "loss weighting (min-SNR)",
                   "objective": "loss definition (type, weighting, timestep range)"}


@dataclass
class RunView:
    folder: Path
    info: dict
    metrics: list
    samples: dict = field(default_factory=dict)  # (step, index) -> path
    prompts: dict = field(default_factory=dict)  # index -> prompt text

    @property
    def config(self) -> dict:
        return self.info.get("config") or {}

    @property
    def label(self) -> str:
        cfg = self.config
        if not cfg:
            return self.folder.name
        name = DISPLAY.get(cfg.get("optim"), cfg.get("optim", "?"))
        shadow = " + shadow" if cfg.get("shadow") and cfg.get("optim") in ("emosens", "emoairy", "emocats") else ""
        return f"{self.folder.name}: {name}{shadow}, lr {cfg.get('lr', 0):g}"

    def series(self, key: str) -> tuple[list, list]:
        rows = [(r["step"], r[key]) for r in self.metrics if r.get(key) is not None]
        return [s for s, _ in rows], [v for _, v in rows]

    def last(self, key: str):
        values = self.series(key)[1]
        return values[-1] if values else None

    def summary(self) -> dict:
        steps, val = self.series("val/loss")
        best = min(range(len(val)), key=val.__getitem__) if val else None
        memory = self.info.get("memory") or {}
        speed = self.series("perf/it_per_s")[1]
        return {"run": self.label, "steps": self.metrics[-1]["step"] if self.metrics else self.info.get("steps"),
                "status": self.info.get("status", "unknown"),
                "final_loss": self.last("train/loss_smoothed"),
                "final_val_loss": val[-1] if val else None,
                "best_val_loss": val[best] if val else None, "best_val_step": steps[best] if val else None,
                "train_seconds": self.metrics[-1].get("time") if self.metrics else self.info.get("seconds"),
                "it_per_s": sum(speed) / len(speed) if speed else self.info.get("steps_per_second"),
                "optimizer_state_bytes": memory.get("optimizer_state_bytes"),
                "peak_memory_mib": self.last("memory/peak_mib")}


def _prompt_of(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.text.get("prompt")
    except OSError:
        return None


def load_run(path) -> RunView:
    folder = RunFolder(path)
    if not folder.run_json.is_file() and not folder.metrics.is_file():
        raise UserError(f"{folder.root} is not an emotrain run folder (no run.json or metrics.jsonl): "
                        "pass the --output folder of a run")
    try:
        info = json.loads(folder.run_json.read_text()) if folder.run_json.is_file() else {}
    except ValueError:
        info = {}  # a run.json being rewritten: the metrics still tell the story
    run = RunView(folder.root, info, read_metrics(folder.metrics))
    if folder.samples.is_dir():
        for p in sorted(folder.samples.iterdir()):
            if m := SAMPLE_NAME.match(p.name):
                run.samples[(int(m.group(1)), int(m.group(2)))] = p
    for (step, k), p in sorted(run.samples.items()):
        if k not in run.prompts:
            run.prompts[k] = _prompt_of(p) or f"prompt {k}"
    return run


def validation_mismatch(a: RunView, b: RunView) -> str | None:
    """Why b's validation loss cannot be drawn on a's axes, or None when it can."""
    va, vb = a.info.get("validation"), b.info.get("validation")
    if not va or not vb:
        return "no validation set"
    for key, what in VALIDATION_KEYS.items():
        if va.get(key) != vb.get(key):
            return f"another {what}"
    return None
