"""What a run's output folder holds, named once (checkpoint.py, run/loop.py and the
commands all ask here; nothing else spells these paths)."""

from __future__ import annotations

import re
from pathlib import Path

RUN_JSON = "run.json"
DRAWS = "draws.jsonl"  # --record-draws: every drawn image, its caption text and flip
CHECKPOINTS = "checkpoints"
LOCK = ".emotrain.lock"  # held for the whole run (lock.py)
STEP_NAME = re.compile(r"^step-(\d{6,})$")
# A checkpoint folder's files; checkpoint.json is written last and marks it complete.
TRAINABLE, TRAINING_STATE, CHECKPOINT_JSON = "trainable.safetensors", "training_state.pt", "checkpoint.json"
CHECKPOINT_FILES = (TRAINABLE, TRAINING_STATE, CHECKPOINT_JSON)
EMA = "ema.safetensors"  # --ema-decay: the EMA of the LoRA by parameter name (run/ema.py); only then
# What watching a run adds: sample images, tracker logs, every step's scalars, the report.
SAMPLES, LOGS, METRICS, REPORT = "samples", "logs", "metrics.jsonl", "report.html"
SAMPLE_NAME = re.compile(r"^step-(\d{6,})-(\d{2,})\.png$")
SWEEP_JSON = "sweep.json"
# What marks a folder as another run's (besides its checkpoints and its LoRA files, which
# lora/formats names): a new run there would replace them.
RUN_FILES = (RUN_JSON, METRICS, REPORT, DRAWS)


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def sample_name(step: int, index: int) -> str:
    """``step-NNNNNN-KK.png``: prompt KK sampled after NNNNNN steps (0: before training)."""
    return f"{step_name(step)}-{index:02d}.png"


def sweep_run_name(optim: str, shadow: bool, lr: float | None = None) -> str:
    """A sweep's run folder: ``emosens``, ``emosens-shadow``, ``emosens-shadow-lr0.0003``
    (the rate in 6 digits, or exactly where 6 digits would name two rates alike)."""
    rate = "" if lr is None else f"{lr:g}" if float(f"{lr:g}") == lr else repr(lr)
    return optim.rsplit(".", 1)[-1] + ("-shadow" if shadow else "") + (f"-lr{rate}" if lr is not None else "")


def shown(path) -> str:
    """``path`` as the user can open it from where they are: relative to the working
    directory when inside it, else absolute."""
    path = Path(path).expanduser().resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


class RunFolder:
    """``OUTPUT/``: run.json, the LoRA files, ``checkpoints/step-NNNNNN/``, draws.jsonl,
    ``samples/``, ``logs/`` (TensorBoard), metrics.jsonl, report.html; a sweep's folder holds
    sweep.json, report.html and one such run folder per optimizer."""

    def __init__(self, root):
        self.root = Path(root).expanduser()

    @property
    def run_json(self) -> Path:
        return self.root / RUN_JSON

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def draws(self) -> Path:
        return self.root / DRAWS

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def trace(self, rank: int) -> Path:
        """EMOTRAIN_TRACE=1: what process ``rank`` trained on (run/processes.py)."""
        return self.root / f"trace-rank-{rank}.jsonl"

    def relative(self, path) -> str:
        """``path`` as run.json records it: relative to the run folder when inside it, so
        a copied or moved run folder still describes itself."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path.resolve())

    @staticmethod
    def of_checkpoint(checkpoint) -> "RunFolder | None":
        """The run folder a checkpoint folder belongs to (``RUN/checkpoints/step-N``)."""
        checkpoint = Path(checkpoint).expanduser()
        if checkpoint.parent.name == CHECKPOINTS:
            return RunFolder(checkpoint.parent.parent)
        return None

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES

    def sample(self, step: int, index: int) -> Path:
        return self.samples / sample_name(step, index)

    @property
    def logs(self) -> Path:
        return self.root / LOGS

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def sweep_json(self) -> Path:
        return self.root / SWEEP_JSON
