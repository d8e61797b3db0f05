"""Every step's scalars: into ``metrics.jsonl`` (what the report reads) and to the
trackers accelerate drives (TensorBoard event files in ``OUTPUT/logs/`` by default,
wandb, or none).

Per step, from values the loop holds anyway: loss, smoothed loss, lr and, for the Emo
family, what the optimizer reports about the step (``opt.stats``): the emotion scalar s,
its short and long averages, the effective step size lr * (1 - |s|) and the shadow
ratio; for Prodigy its d and d x lr, for schedule-free AdamW its warm-up lr. Every
``--log-every`` steps also the figures that cost a pass over the gradients or a host
sync: gradient norm before clipping, the fraction of elements the filter held back
(counted by the optimizer), it/s and memory.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

from ..disk.atomic import write_text
from ..options import shareable

PROJECT = "emotrain"
MIB = 2**20


def accelerator_settings(cfg, folder) -> dict:
    """Accelerator(...) keywords that give it the run's trackers."""
    if cfg.log_with == "none":
        return {}
    from accelerate.utils import ProjectConfiguration
    return {"log_with": cfg.log_with,
            "project_config": ProjectConfiguration(project_dir=str(folder.root), logging_dir=str(folder.logs))}


def start_trackers(accelerator, cfg, folder, resumed_at: int | None) -> None:
    if cfg.log_with == "none":
        return
    config = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))  # wandb uploads it: names, not paths
              for k, v in shareable(cfg.to_dict()).items() if v is not None}
    # TensorBoard hides what an interrupted attempt logged after the checkpoint (after
    # step 0 if this run starts afresh in a folder an attempt without checkpoint left).
    kwargs = {"wandb": {"name": folder.root.name, "dir": str(folder.logs)},
              "tensorboard": {"purge_step": 0 if resumed_at is None else resumed_at + 1}}
    folder.logs.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(PROJECT, config=config, init_kwargs=kwargs)


def log_images(accelerator, images: dict, step: int) -> None:
    """{tag: PIL image} to every tracker that takes images."""
    import numpy as np

    arrays = {tag: np.asarray(image.convert("RGB"))[None] for tag, image in images.items()}
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images(arrays, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: list(a) for tag, a in arrays.items()}, step=step)


def finish_trackers(accelerator) -> None:
    """Finish the trackers that started; one whose start a signal cut short (accelerate
    lists it before it starts) has nothing to finish."""
    for tracker in accelerator.trackers:
        try:
            tracker.tracker  # what start() creates (TensorBoard's writer, wandb's run)
        except AttributeError:
            continue
        tracker.finish()
    accelerator.trackers.clear()


def optimizer_scalars(optimizer, counted: bool) -> dict:
    """What the Emo optimizer itself reports about its last step (nothing for others)."""
    stats = getattr(optimizer, "stats", None)
    if stats is None:
        return {}
    out = {"emotion/s": stats.s, "emotion/effective_lr": stats.effective_lr[0],
           "emotion/shadow_ratio": stats.shadow_ratio[0]}
    if stats.short is not None:
        out.update({"emotion/short": stats.short, "emotion/long": stats.long})
    if counted and stats.held_back is not None:
        out["emotion/filter_held_back"] = stats.held_back_fraction()
    return out


def lr_free_scalars(optimizer, lr: float | None) -> dict:
    """The effective learning rate of the lr-free optimizers, after the step: Prodigy's
    d (as it holds it now, the estimate its next step uses) x the step's lr; a
    schedule-free optimizer's lr with its own warm-up applied (``scheduled_lr``)."""
    group = optimizer.param_groups[0]
    if "d" in group and "d0" in group and lr is not None:  # prodigyopt's Prodigy
        return {"optim/d": float(group["d"]), "optim/effective_lr": float(group["d"]) * lr}
    if "scheduled_lr" in group and "train_mode" in group:  # the schedulefree package
        return {"optim/effective_lr": float(group["scheduled_lr"])}
    return {}


def memory_scalars(device) -> dict:
    """Peak and current memory: the CUDA allocator's on a GPU, the process's on the CPU."""
    if device.type == "cuda":
        return {"memory/peak_mib": torch.cuda.max_memory_allocated(device) / MIB,
                "memory/now_mib": torch.cuda.memory_allocated(device) / MIB}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {"memory/peak_mib": peak / MIB}
    try:
        with open("/proc/self/statm") as f:
            out["memory/now_mib"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError):
        pass
    return out


def gradient_norm(params, scaler=None) -> torch.Tensor:
    """The total L2 norm of the gradients (unscaled under fp16's GradScaler)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    if scaler is not None and scaler.is_enabled():
        norm = norm / scaler.get_scale()
    return norm


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a crash is skipped."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class MetricsFile:
    """``metrics.jsonl``: one JSON object per step (step 0: before training), appended
    as the run goes. A resumed run first drops what an interrupted attempt wrote after
    its checkpoint, so the file always tells one straight run."""

    def __init__(self, path: Path, resumed_at: int | None):
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resumed_at] if resumed_at is not None else []
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.last = kept[-1] if kept else {}
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # line-buffered: each step reaches the file as it ends

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self.last = record

    def close(self) -> None:
        self._file.close()
