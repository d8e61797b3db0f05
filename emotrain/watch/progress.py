"""The live view of a run: a rich progress bar with loss, emotion scalar, LR, speed and
time left, fitted to the terminal's width (at 80 columns nothing is cut: the bar gives
way first). Without a terminal (nohup, CI, ``> log``) no bar is drawn: a plain line every
``every`` seconds (and for the first and last step) shows the run is alive."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from ..disk.layout import shown

SMOOTHING = 0.9  # loss shown as an exponential moving average, as kohya does
MIN_BAR = 6


def clock(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TrainProgress:
    def __init__(self, total_steps: int, console: Console | None = None, every: float = 30.0):
        self.console = console or Console(stderr=True)
        self.plain = not self.console.is_terminal
        if self.plain:
            self.console.soft_wrap = True  # a log file has no width: never break a line
        self.total, self.every = total_steps, every
        self.smoothed = None
        self._bar = BarColumn(bar_width=20)
        self._progress = Progress(TextColumn("{task.description}"), self._bar, TextColumn("{task.fields[line]}"),
                                  console=self.console, disable=self.plain)
        self._task = None
        self._started = None
        self._first_step = 0
        self._last_print = 0.0

    def _due(self) -> bool:
        now = time.perf_counter()
        if now - self._last_print >= self.every:
            self._last_print = now
            return True
        return False

    def _fit(self, description: str, line: str) -> str:
        """Give the bar what the text leaves; drop the description before the text is cut."""
        width = self.console.width
        room = width - len(line) - len(description) - 2
        if room < MIN_BAR and description:
            description, room = "", width - len(line) - 1
        self._bar.bar_width = max(0, room)
        return description

    @contextmanager
    def task(self, description: str, total: int | None = None):
        """A short phase before training (loading, encoding) with its own bar."""
        if self.plain:
            self.console.print(f"{description}" + (f" ({total})" if total else "") + " ...")
            done = [0]

            def advance(n=1):
                done[0] += n
                if total and self._due():
                    self.console.print(f"{description} {done[0]}/{total}")
            yield advance
            return
        # Transient: once done (or failed) the phase's bar goes, leaving errors on their own line.
        self._progress.live.transient = True
        with self._progress:
            line = lambda n: f"{n}/{total}" if total else ""  # noqa: E731
            task = self._progress.add_task(self._fit(description, line(total)), total=total, line=line(0))
            count = [0]

            def advance(n=1):
                count[0] += n
                self._progress.update(task, advance=n, line=line(count[0]))
            yield advance
            self._progress.update(task, completed=total or 1, total=total or 1)
            self._progress.remove_task(task)

    def enabled(self, on: bool) -> None:
        """Only one process of a multi-GPU run draws the bar."""
        self.console.quiet = not on
        self._progress.disable = not on or self.plain

    def __enter__(self):
        self._started = None
        self._last_print = 0.0
        if not self.plain:
            self._progress.live.transient = False
            self._progress.start()
            self._task = self._progress.add_task(self._fit("training", ""), total=self.total, line="")
        return self

    def __exit__(self, *exc):
        self._progress.stop()

    def update(self, step: int, loss: float, emotion: float | None, lr: float | list[float]) -> None:
        """``lr``: one number, or each parameter group's where they differ."""
        self.smoothed = loss if self.smoothed is None else SMOOTHING * self.smoothed + (1 - SMOOTHING) * loss
        now = time.perf_counter()
        if self._started is None:  # timed from the first finished step: excludes warm-up
            self._started, self._first_step = now, step
        elapsed = now - self._started
        rate = (step - self._first_step) / elapsed if elapsed > 0 else None
        eta = clock((self.total - step) / rate) if rate else "?"
        stats = f"loss {self.smoothed:.4f}" + (f" s {emotion:+.3f}" if emotion is not None else "") + " lr " + (
            "/".join(f"{x:.1e}" for x in lr) if isinstance(lr, list) else f"{lr:.1e}")
        speed = f"{rate:.2f} it/s" if rate else "- it/s"
        if self.plain:
            if self._due() or step in (self._first_step, self.total):
                self.console.print(f"step {step}/{self.total}  {stats}  {speed}  elapsed {clock(elapsed)}  ETA {eta}")
            return
        line = f"{step}/{self.total} {stats} {speed} {clock(elapsed)}<{eta}"
        self._progress.update(self._task, description=self._fit("training", line), completed=step, line=line)

    def summary(self, run: dict, root) -> None:
        losses = [x for x in run["losses"] if x is not None]
        mem = run["memory"]
        k = max(1, len(losses) // 10)
        if losses:
            first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
            self.console.print(f"loss {first:.4f} -> {last:.4f} (mean of first/last {k} steps)")
        line = f"optimizer state {mem['optimizer_state_bytes'] / 2**20:.1f} MiB, peak RSS {mem['process_peak_rss_bytes'] / 2**20:.0f} MiB"
        if "cuda_peak_allocated_bytes" in mem:
            line += f", CUDA peak allocated {mem['cuda_peak_allocated_bytes'] / 2**20:.0f} MiB"
        self.console.print(line)
        self.console.print("saved " + " and ".join(shown(root / f) for f in run["files"].values()))
