"""The live view of a run: a rich progress bar with loss, emotion scalar, LR and speed."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

SMOOTHING = 0.9  # loss shown as an exponential moving average, as kohya does


class TrainProgress:
    def __init__(self, total_steps: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.total = total_steps
        self.smoothed = None
        self._progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
        self._task = None
        self._started = None
        self._first_step = 0

    @contextmanager
    def task(self, description: str, total: int | None = None):
        """A short phase before training (loading, encoding) with its own bar."""
        # Transient: once done (or failed) the phase's bar goes, leaving errors on their own line.
        self._progress.live.transient = True
        with self._progress:
            task = self._progress.add_task(description, total=total, stats="", speed="")
            yield lambda n=1: self._progress.advance(task, n)
            self._progress.update(task, completed=total or 1, total=total or 1)
            self._progress.remove_task(task)

    def enabled(self, on: bool) -> None:
        """Only one process of a multi-GPU run draws the bar."""
        self.console.quiet = not on
        self._progress.disable = not on

    def __enter__(self):
        self._progress.live.transient = False
        self._progress.start()
        self._task = self._progress.add_task("training", total=self.total, stats="", speed="")
        self._started = None
        return self

    def __exit__(self, *exc):
        self._progress.stop()

    def update(self, step: int, loss: float, emotion: float | None, lr: float) -> None:
        self.smoothed = loss if self.smoothed is None else SMOOTHING * self.smoothed + (1 - SMOOTHING) * loss
        stats = f"loss {self.smoothed:.4f}" + (f"  s {emotion:+.3f}" if emotion is not None else "") + f"  lr {lr:.2e}"
        now = time.perf_counter()
        if self._started is None:  # timed from the first finished step: excludes warm-up
            self._started, self._first_step = now, step
        elapsed = now - self._started
        speed = f"{(step - self._first_step) / elapsed:.2f} it/s" if elapsed > 0 else ""
        self._progress.update(self._task, completed=step, stats=stats, speed=speed)

    def summary(self, run: dict) -> None:
        losses = run["losses"]
        mem = run["memory"]
        k = max(1, len(losses) // 10)
        if losses:
            first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
            self.console.print(f"loss {first:.4f} -> {last:.4f} (mean of first/last {k} steps)")
        line = f"optimizer state {mem['optimizer_state_bytes'] / 2**20:.1f} MiB, peak RSS {mem['process_peak_rss_bytes'] / 2**20:.0f} MiB"
        if "cuda_peak_allocated_bytes" in mem:
            line += f", CUDA peak allocated {mem['cuda_peak_allocated_bytes'] / 2**20:.0f} MiB"
        self.console.print(line)
        self.console.print(f"saved {run['files']['kohya']} and {run['files']['diffusers']}")
