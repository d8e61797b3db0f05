"""run.json from a run's first step to its last word.

It holds the whole loss and emotion history: a checkpoint carries the history up to its
step, so a resumed run's run.json continues it rather than starting over. The status is
written on every way out: ``finished``, ``interrupted`` (Ctrl-C, SIGTERM), ``stopped-nan``
(the loss or the training state became non-finite) or ``error`` (with the message).
Only the main process writes.
"""

from __future__ import annotations

from .layout import RunFolder
from .runinfo import write_json


class RunRecord:
    def __init__(self, folder: RunFolder, info: dict, enabled: bool, history: dict | None = None,
                 step: int = 0):
        self.folder, self.info, self.enabled = folder, info, enabled
        history = history or {}
        known = step - len(history.get("losses", [])[:step])  # a checkpoint from before histories: unknown
        self.losses = [None] * known + list(history.get("losses", []))[:step]
        self.emotion = [None] * known + list(history.get("emotion_scalar", []))[:step]
        self.outcome: dict = {}

    def add(self, loss: float, emotion: float | None) -> None:
        self.losses.append(loss)
        self.emotion.append(emotion)

    def history(self) -> dict:
        """What a checkpoint carries, so that a resume continues it."""
        return {"losses": list(self.losses), "emotion_scalar": list(self.emotion)}

    def write(self, status: str, **fields) -> None:
        if self.enabled:
            write_json(self.folder.run_json, {**self.info, **fields, "status": status, "losses": self.losses,
                                              "emotion_scalar": self.emotion})

    def __enter__(self) -> "RunRecord":
        self.write("running")
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is None:
            return
        if isinstance(exc, KeyboardInterrupt):
            status = "interrupted"
        else:
            status = getattr(exc, "status", "error")
        self.write(status, message=str(exc) or type(exc).__name__, steps=len(self.losses), **self.outcome)
