"""``emotrain sdxl-lora``: check everything the command line says, and on CUDA that the
planned peak fits the device's free memory (run/memory.py), take the output folder (its
lock, leftovers tidied), refuse what would mix two runs or replace one, then train. A folder holds another run when it holds any of a run's files (run.json, a LoRA
file, metrics.jsonl, report.html, a checkpoint): only a run that stopped before it saved
anything (no checkpoint, no LoRA) is started over. A resumed run never replaces a
checkpoint it did not use: it sets it aside (``step-NNNNNN.unused``) first."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

from ..config import absolute_paths, check_output_folder, config_from_dict, resolve_config, resumed_config
from ..disk.checkpoint import list_checkpoints
from ..disk.layout import RUN_FILES, STEP_NAME, RunFolder
from ..disk.lock import OutputLock
from ..disk.tidy import clean_leftovers, incomplete_checkpoints, set_aside
from ..disk.verify import choose_checkpoint, problem, read_meta, step_folders
from ..errors import UserError
from ..lora.formats import FORMATS
from ..optimizers import lr_note
from ..run import processes
from ..run.signals import StopRequests


def resume_config(path: str, overrides: dict):
    """The resumed run's config and checkpoint, and a note per newer checkpoint skipped.
    The run folder being resumed is the output (wherever it now is), unless --output
    names another folder to continue into."""
    ckpt, skipped = choose_checkpoint(path)
    meta = read_meta(ckpt)
    run_folder = RunFolder.of_checkpoint(ckpt)
    if overrides.get("output") is None:
        if run_folder is None:
            raise UserError(f"checkpoint {ckpt} is not inside a run folder's checkpoints/: pass --output DIR for the "
                            "continued run")
        overrides = {**overrides, "output": str(run_folder.root.resolve())}
    cfg = resumed_config(config_from_dict(meta["config"]), overrides)
    if cfg.steps < meta["step"]:
        raise UserError(f"--steps {cfg.steps} is below the checkpoint's step {meta['step']}: pass a larger --steps")
    check_output_folder(cfg.output)
    _check_resume_target(cfg.output, ckpt, meta["step"], explicit=Path(path).expanduser() == ckpt)
    return cfg, ckpt, skipped


def _check_resume_target(output: str, ckpt: Path, step: int, explicit: bool) -> None:
    """A resumed run continues its own history: into its own folder, or into a folder
    that holds no run."""
    target = RunFolder(output)
    own = RunFolder.of_checkpoint(ckpt)
    if own is None or target.root.resolve() != own.root.resolve():
        _refuse_other_run(target, output, restart=False)  # no other run's metrics under this history
        return
    newer = [c for c in list_checkpoints(target.checkpoints) if int(c.name.split("-")[1]) > step]
    if explicit and any(problem(c) is None for c in newer):
        raise UserError(f"{output} holds newer checkpoints ({newer[-1].name}) than {ckpt.name}: continuing there from "
                        f"{ckpt.name} would mix two histories; pass --output NEW_DIR to continue into a new folder")


STOPPED_EARLY = ("running", "interrupted", "stopped-nan", "error")  # run.json's status of a run that may end unsaved


def _status(folder: RunFolder) -> str | None:
    try:
        info = json.loads(folder.run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info.get("status") if isinstance(info, dict) else None


def _refuse_other_run(folder: RunFolder, output: str, restart: bool = True) -> str | None:
    """Refuse a folder that holds another run's work; -> a note when it holds only what
    a run that stopped before saving anything left (a new run starts over there, if
    ``restart``)."""
    if folder.sweep_json.is_file():
        raise UserError(f"{output} holds a sweep (sweep.json): pass another --output (the sweep's runs are its "
                        "subfolders; `emotrain sweep` with the same flags continues it)")
    existing = step_folders(folder.checkpoints)
    if existing:  # a new run there would mix with (and prune) another run's checkpoints
        raise UserError(f"{output} already holds a run (checkpoint {existing[-1].name}): continue it with "
                        f"--resume {output}, or pass another --output")
    loras = [name for f in FORMATS.values() for name in (f.file_name, f.ema_file_name)
             if (folder.root / name).exists()]
    found = loras + [name for name in RUN_FILES if (folder.root / name).exists()]
    if not found:
        return None
    status = _status(folder)
    if restart and not loras and status in STOPPED_EARLY:
        return f"note: {output} held a run that stopped ({status}) before its first checkpoint: starting over there"
    what = "a finished run" if status == "finished" else "a run"
    raise UserError(f"{output} already holds {what} ({', '.join(found[:3])}) with no checkpoint to continue it "
                    "from: pass another --output (a new run there would replace those files)")


def _aside(path: Path, why: str, other: str) -> Path:
    """``path`` renamed aside (kept), or one line saying what to do when it cannot be."""
    try:
        return set_aside(path)
    except OSError as exc:
        raise UserError(f"cannot set aside {path}, which {why} ({exc.strerror}): move it away yourself, or "
                        f"{other}") from None


def _set_aside_stopped(folder: RunFolder) -> list[str]:
    """The files of a run that stopped before its first checkpoint, renamed aside before
    the new run writes its own: kept, and said so."""
    notes = []
    for name in RUN_FILES:
        path = folder.root / name
        if path.exists():
            aside = _aside(path, "the new run would replace", "pass another --output")
            notes.append(f"note: kept the stopped run's {name} as {aside.name}")
    return notes


def _set_aside_newer(output: str, ckpt: Path) -> list[str]:
    """Before a run resumed in its own folder from ``ckpt`` saves over the newer
    checkpoints it skipped (each unusable), rename them aside: kept, and said so."""
    own, target = RunFolder.of_checkpoint(ckpt), RunFolder(output)
    if own is None or own.root.resolve() != target.root.resolve():
        return []
    step = read_meta(ckpt)["step"]
    notes = []
    for path in step_folders(own.checkpoints):
        if int(STEP_NAME.match(path.name).group(1)) > step:
            aside = _aside(path, "this run would replace", "resume with --output NEW_DIR")
            notes.append(f"note: kept {path.name}, which this run does not use, as {own.relative(aside)}")
    return notes


def run_training(preset: str | None, overrides: dict, resume: str | None = None) -> dict:
    """Check everything the command line says, take the output folder, then train
    (torch is imported only then)."""
    notes = []
    if resume is not None:
        if preset is not None:
            raise UserError("--preset and --resume together: a resumed run takes its config from the checkpoint")
        cfg, ckpt, notes = resume_config(resume, overrides)
    else:
        cfg, ckpt = absolute_paths(resolve_config(preset, overrides)), None
        _refuse_other_run(RunFolder(cfg.output), cfg.output)
    notes = [*notes, lr_note(cfg.optim, cfg.lr)]  # an lr meant for another optimizer: a warning, the run goes on
    from ..run import memory  # before the folder is taken and the model loads: a run that cannot fit stops here
    planned, memory_note = memory.check(cfg)
    notes.append(memory_note)
    main = processes.is_main()  # under accelerate launch, one process holds the lock and tidies
    with OutputLock(cfg.output) if main else nullcontext() as lock:
        if main:
            notes.append(lock.message())
            if ckpt is None:
                restart = _refuse_other_run(RunFolder(cfg.output), cfg.output)  # again, now no run can start there
                notes += [restart, *(_set_aside_stopped(RunFolder(cfg.output)) if restart else [])]
            else:
                notes += _set_aside_newer(cfg.output, ckpt)
            notes += [clean_leftovers(cfg.output), incomplete_checkpoints(cfg.output) if ckpt else None]
            for note in filter(None, notes):
                print(note, file=sys.stderr)
        try:
            with StopRequests():  # a signal while torch loads (before train() takes them): one line, lock released
                from ..run.loop import train
            return train(cfg, resume=ckpt, planned=planned)
        except KeyboardInterrupt as exc:  # before the first step, or a second signal: no checkpoint of this moment
            found = list_checkpoints(RunFolder(cfg.output).checkpoints)
            by = f" by {exc.args[0]}" if exc.args else ""
            stop = UserError(f"stopped at once{by}: nothing of this moment was saved; " + (
                f"the last checkpoint is {found[-1]} (--resume {cfg.output} continues from it)" if found
                else "there is no checkpoint yet"))
            stop.exit_code = 130
            raise stop from None
