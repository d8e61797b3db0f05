"""A finished (or stopped) run folder, read back for the report: run.json, every step's
scalars from metrics.jsonl, the sample images and their prompts; and a sweep's
sweep.json. ``run_info`` and ``read_sweep`` are pure Python and refuse a damaged file
with one line: the commands call them to check their arguments before anything heavy
(matplotlib, torch) is imported."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..disk.layout import SAMPLE_NAME, RunFolder
from ..optimizers import DISPLAY

# What must match for two validation losses to be comparable, with how to say it.
VALIDATION_KEYS = {"data": "training data", "images_sha256": "validation images", "seed": "seed (noise)",
                   "timesteps": "validation timesteps", "model": "model", "resolution": "resolution",
                   "min_snr_gamma": "loss weighting (min-SNR)",
                   "objective": "loss definition (type, weighting, timestep range)"}


def lr_text(cfg: dict) -> str:
    """``lr 3e-4``, and each part's lr where the run gives one (--unet-lr, --text-encoder-lr:
    TE1/TE2) and LoRA+'s ratio, as the optimizer's groups have them."""
    lr = cfg.get("lr", 0)
    parts = []
    if cfg.get("unet_lr") is not None:
        parts.append(f"unet {cfg['unet_lr']:g}")
    if cfg.get("text_encoder_lr") and cfg.get("train_text_encoders"):
        parts.append("te " + "/".join(f"{float(v):g}" for v in cfg["text_encoder_lr"]))
    if cfg.get("loraplus_ratio"):
        parts.append(f"LoRA+ x{cfg['loraplus_ratio']:g}")
    return f"lr {lr:g}" + (f" ({', '.join(parts)})" if parts else "")


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
        return f"{self.folder.name}: {name}{shadow}, {lr_text(cfg)}"

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
                "final_val_loss_ema": self.last("val/loss_ema"),  # --ema-decay
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


def _damaged(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not text"
    if isinstance(exc, json.JSONDecodeError):  # where it stops: a truncated file ends early
        return f"truncated or not JSON: {exc.msg.lower()} (line {exc.lineno}, column {exc.colno})"
    if isinstance(exc, ValueError):
        return f"not JSON: {str(exc)[:80]}"
    return exc.strerror or type(exc).__name__


def run_info(path) -> dict:
    """The run folder ``path``'s run.json ({} when only metrics.jsonl is there), or a
    UserError naming what is wrong: no run folder, or a damaged run.json."""
    if not str(path).strip():
        raise UserError("a run folder is empty: pass the --output folder of a run")
    folder = RunFolder(path)
    if not folder.root.is_dir():
        raise UserError(f"run folder {path} " + ("is a file" if folder.root.exists() else "does not exist") +
                        ": pass the --output folder of a run")
    if not folder.run_json.is_file() and not folder.metrics.is_file():
        raise UserError(f"{folder.root} is not an emotrain run folder (no run.json or metrics.jsonl): "
                        "pass the --output folder of a run")
    if not folder.run_json.is_file():
        return {}
    try:  # written atomically: a run.json that does not parse is damaged, not half-written
        info = json.loads(folder.run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder.run_json} is damaged ({_damaged(exc)}): put back a good copy, "
                        "or leave this run out of the report") from None
    if not isinstance(info, dict):
        kind = {list: "a list", str: "a string", bool: "true or false", type(None): "null"}.get(type(info), "a number")
        raise UserError(f"{folder.run_json} is damaged (it holds {kind}, not the object a run writes): put back a good "
                        "copy, or leave this run out of the report")
    return info


def read_sweep(folder: RunFolder, fix: str) -> dict[str, dict]:
    """A sweep's runs from its sweep.json, by name: {name: config}, in its order; a
    UserError ending in ``fix`` when the file is damaged."""
    problem = None
    try:
        data = json.loads(folder.sweep_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problem = _damaged(exc)
    else:
        runs = data.get("runs") if isinstance(data, dict) else None
        if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str) and
                                                 r["name"] and isinstance(r.get("config"), dict) for r in runs):
            problem = "not the list of runs a sweep writes"
    if problem:
        raise UserError(f"{folder.sweep_json} is damaged ({problem}): put back a good copy, or {fix}")
    return {r["name"]: r["config"] for r in runs}


def load_run(path) -> RunView:
    from .logs import read_metrics  # logs imports torch

    folder = RunFolder(path)
    info = run_info(path)
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
