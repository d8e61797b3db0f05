"""Ctrl-C and SIGTERM (what ``timeout``, ``docker stop`` and SLURM send) during a run.

Before the first step (loading, encoding) either signal stops at once. Once training
runs, the first one only asks to stop: the loop looks once per step, after the gradients
and before the update, agrees with the other processes, and stops there with a
checkpoint of the state where the step began. So a signal can never land inside
``optimizer.step()`` and leave a half-updated state to be saved under a finished step's
name. A second Ctrl-C stops at once, without a checkpoint; a repeated SIGTERM changes
nothing (SLURM signals every process of a job and the launcher forwards it again: one
request, delivered twice).
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    def __init__(self):
        self.requested: str | None = None
        self.deferring = False
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def defer(self) -> None:
        """From here on, the first signal waits for the loop's next look."""
        self.deferring = True

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.deferring and (self.requested is None or signum == signal.SIGTERM):
            self.requested = self.requested or name
            return
        raise KeyboardInterrupt(name)
