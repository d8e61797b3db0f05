"""Checking a checkpoint fully before it is used, and choosing the newest good one.

``checkpoint.json`` records each file's size and sha256, and a checksum of its own
content; a checkpoint is good when all of them match. ``--resume RUN`` takes the newest
good checkpoint and says which newer ones it skipped and why; ``--resume CHECKPOINT``
takes that one or refuses with the reason. Pure Python (hashlib): this runs before torch
is imported and the model loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError
from .layout import CHECKPOINT_FILES, CHECKPOINT_JSON, EMA, STEP_NAME, RunFolder

CHECKPOINT_VERSIONS = (1, 2)  # 1: before sizes and checksums were recorded (checked for presence only)
CHUNK = 1 << 22


def file_record(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def self_checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_meta(path: Path) -> dict:
    """The checkpoint folder ``path``'s checkpoint.json, or a UserError saying what is wrong with it."""
    file = path / CHECKPOINT_JSON
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("it has no checkpoint.json (a save or delete that did not finish)") from None
    except (ValueError, OSError) as exc:
        raise UserError(f"its checkpoint.json is unreadable ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(meta, dict) or meta.get("format") not in CHECKPOINT_VERSIONS:
        raise UserError(f"its checkpoint.json has an unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if "sha256" in meta and meta["sha256"] != self_checksum(meta):
        raise UserError("its checkpoint.json was changed after it was written (its checksum differs); "
                        "put back the original, and pass changes such as --steps as flags")
    for key in ("step", "data", "config"):
        if key not in meta:
            raise UserError(f"its checkpoint.json lacks {key!r}")
    return meta


def problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be used, or None when it is good."""
    try:
        meta = read_meta(path)
    except UserError as exc:
        return str(exc)
    records = meta.get("files") or {}
    for name in (*CHECKPOINT_FILES, *((EMA,) if EMA in records else ())):  # the EMA's when one was saved
        if name == CHECKPOINT_JSON:
            continue
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        want = records.get(name)
        if not want:
            if meta["format"] >= 2:
                return f"checkpoint.json records nothing about {name}"
            continue
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{name} is {size} bytes where checkpoint.json records {want['bytes']} (truncated or replaced)"
        if file_record(file)["sha256"] != want["sha256"]:
            return f"{name} does not match the sha256 checkpoint.json records (the file is damaged)"
    return None


def step_folders(folder: Path) -> list[Path]:
    """Folders named like checkpoints in ``folder``, oldest step first, whatever their state."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def choose_checkpoint(path) -> tuple[Path, list[str]]:
    """``--resume``'s checkpoint: the folder itself when it is one, else the newest good
    checkpoint of the run folder. -> (checkpoint, one line per newer one it skipped)."""
    if not str(path).strip():
        raise UserError("--resume is empty: pass a run's output folder or one of its checkpoints/step-NNNNNN")
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist: pass a run's output folder or one of its checkpoints/step-NNNNNN")
    if not path.is_dir():
        raise UserError(f"{path} is a file: pass a run's output folder or one of its checkpoints/step-NNNNNN")
    if STEP_NAME.match(path.name) or (path / CHECKPOINT_JSON).exists():
        reason = problem(path)
        if reason:
            raise UserError(f"checkpoint {path} cannot be used: {reason}. Resume from its run folder to take the "
                            "newest good checkpoint instead")
        return path, []
    candidates = step_folders(RunFolder(path).checkpoints) or step_folders(path)
    if not candidates:
        raise UserError(f"no checkpoint in {path}: pass a run's output folder or a checkpoints/step-NNNNNN "
                        "folder (runs write one at the end, and every --save-every N steps)")
    skipped = []
    for candidate in reversed(candidates):
        reason = problem(candidate)
        if reason is None:
            return candidate, skipped
        skipped.append(f"skipped checkpoint {candidate.name}: {reason}")
    raise UserError(f"no usable checkpoint in {path}: " + "; ".join(s.removeprefix("skipped checkpoint ")
                                                                      for s in skipped))
