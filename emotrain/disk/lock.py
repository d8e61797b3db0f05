"""One run per output folder: a lock file held for the whole run.

``OUTPUT/.emotrain.lock`` holds the pid, the host and when the run started. It is made
complete under a temporary name and hard-linked into place, which fails if a lock is
there: two runs can never both take it. A lock whose process is gone (same host, no such
pid, or a pid that now belongs to a process started later) is stale: it is taken over with
a message, or, when it cannot be removed (an immutable file, a folder that takes no
deletes), refused with one line saying so. A live holder, or one from another host (which
cannot be checked), refuses with one line; when the live process may not be the run that
took the lock (an old lock without the start time, naming a reused pid), the line says how
to clear it. Pure Python.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import UserError
from .layout import RunFolder


def _start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot, Linux), to tell a reused pid."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _program(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or None
    except OSError:
        return None


def _alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    now = _start_ticks(pid)
    return start_ticks is None or now is None or now == start_ticks


class OutputLock:
    def __init__(self, output):
        self.path = RunFolder(output).lock
        self.held = False
        self.took_over: dict | None = None  # the stale lock this run replaced
        self.made_folder = False

    def acquire(self) -> "OutputLock":
        self.made_folder = not self.path.parent.exists()
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "start_ticks": _start_ticks(os.getpid())}
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(me))
        except OSError as exc:
            raise UserError(f"cannot write to {self.path.parent} ({exc.strerror}): pass an --output folder you "
                            "can write to") from None
        try:
            for _ in range(3):
                try:
                    self._create(tmp, me)
                    self.held = True
                    return self
                except FileExistsError:
                    self._check_holder()
        finally:
            tmp.unlink(missing_ok=True)
        self.release()
        raise UserError(f"could not take the lock {self.path}: another run keeps taking it; pass another --output")

    def _create(self, tmp: Path, me: dict) -> None:
        """Put the lock in place, failing with FileExistsError if one is there."""
        try:
            os.link(tmp, self.path)  # complete from its first moment
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: exclusive creation instead
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me))

    def _check_holder(self) -> None:
        """Refuse if the lock's holder lives; remove a stale lock (and remember whose)."""
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            holder, pid, host = {}, None, None
        where = RunFolder(self.path.parent).root
        if pid is None:
            raise UserError(f"{where} is locked by {self.path}, which is unreadable: if no run uses {where}, "
                            "delete it")
        if host != socket.gethostname():
            raise UserError(f"{where} is in use by an emotrain run on host {host} (pid {pid}, since "
                            f"{holder.get('started')}): wait for it or pass another --output; if that run is gone, "
                            f"delete {self.path}")
        if _alive(pid, holder.get("start_ticks")):
            if holder.get("start_ticks") is not None and _start_ticks(pid) is not None:  # that very process
                raise UserError(f"{where} is in use by another emotrain run (pid {pid}, since "
                                f"{holder.get('started')}): wait for it to finish or pass another --output")
            program = _program(pid)
            raise UserError(f"{where} is locked by pid {pid}" + (f" ({program})" if program else "") +
                            f", since {holder.get('started')}, a live process that may not be the run that took the "
                            f"lock (the lock cannot tell): if no emotrain run uses {where}, delete {self.path}; "
                            "else wait for it or pass another --output")
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            raise UserError(f"{where} holds the lock of a run that is gone (pid {pid}), and it cannot be removed "
                            f"({exc.strerror}): delete {self.path} yourself (check its permissions and attributes, "
                            "e.g. lsattr), or pass another --output") from None
        self.took_over = holder

    def release(self) -> None:
        """Let go; a folder the lock made and nothing else filled goes too (a run refused
        after the lock, for a bad image say, leaves nothing behind)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.made_folder and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()

    def message(self) -> str | None:
        if self.took_over:
            return (f"note: took over the lock of an earlier run that is no longer running (pid "
                    f"{self.took_over.get('pid')}, started {self.took_over.get('started')})")
        return None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
