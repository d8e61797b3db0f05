"""``emotrain sdxl-lora``: check everything the command line says, take the output
folder (its lock, leftovers tidied), refuse what would mix two runs, then train."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

from ..config import absolute_paths, check_output_folder, config_from_dict, resolve_config, resumed_config
from ..disk.checkpoint import list_checkpoints
from ..disk.layout import RunFolder
from ..disk.lock import OutputLock
from ..disk.tidy import clean_leftovers
from ..disk.verify import choose_checkpoint, problem, read_meta, step_folders
from ..errors import UserError
from ..optimizers import lr_note
from ..run import processes


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
        _refuse_other_run(target, output)
        return
    newer = [c for c in list_checkpoints(target.checkpoints) if int(c.name.split("-")[1]) > step]
    if explicit and any(problem(c) is None for c in newer):
        raise UserError(f"{output} holds newer checkpoints ({newer[-1].name}) than {ckpt.name}: continuing there from "
                        f"{ckpt.name} would mix two histories; pass --output NEW_DIR to continue into a new folder")


def _refuse_other_run(folder: RunFolder, output: str) -> None:
    existing = step_folders(folder.checkpoints)
    if existing:  # a new run there would mix with (and prune) another run's checkpoints
        raise UserError(f"{output} already holds a run (checkpoint {existing[-1].name}): continue it with "
                        f"--resume {output}, or pass another --output")


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
    main = processes.is_main()  # under accelerate launch, one process holds the lock and tidies
    with OutputLock(cfg.output) if main else nullcontext() as lock:
        if main:
            if ckpt is None:
                _refuse_other_run(RunFolder(cfg.output), cfg.output)  # again, now that no run can start there
            notes += [lock.message(), clean_leftovers(cfg.output)]
            for note in filter(None, notes):
                print(note, file=sys.stderr)
        from ..run.loop import train
        try:
            return train(cfg, resume=ckpt)
        except KeyboardInterrupt:  # before the first step, or a second signal: no checkpoint of this moment
            found = list_checkpoints(RunFolder(cfg.output).checkpoints)
            stop = UserError("stopped at once: nothing of this moment was saved; " + (
                f"the last checkpoint is {found[-1]} (--resume {cfg.output} continues from it)" if found
                else "there is no checkpoint yet"))
            stop.exit_code = 130
            raise stop from None
