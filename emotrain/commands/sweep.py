"""``emotrain sweep``: the same run with several optimizers (and shadow settings and
learning rates), one after another, on the same data, seed, noise and validation set,
into ``OUTPUT/<optim>[-shadow][-lr<x>]/``, then one report that overlays them.

A sweep is resumable: run the same command again and finished runs are kept, the
interrupted one continues from its latest checkpoint (``--resume``), the rest start.
Another command on the same folder may add runs (other optimizers, shadow settings or
learning rates, with the same shared settings): sweep.json keeps every run any command
planned there, and the report overlays them all. Everything is checked before
sweep.json is written, and before the report's modules (matplotlib, torch) load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..disk.atomic import write_text
from ..disk.checkpoint import list_checkpoints
from ..config import TrainConfig, given_values, resolve_config
from ..errors import TrainingStopped, UserError
from ..disk.layout import RunFolder, shown, sweep_run_name
from ..optimizers import DEFAULT_LR, EMO
from ..options import BY_NAME, RESUMABLE
from ..watch.runs import read_sweep, run_info

SHADOWS = {"off": (False,), "on": (True,), "both": (False, True)}
DEFAULT_VAL_SPLIT = 0.1


@dataclass
class SweepRun:
    name: str
    cfg: TrainConfig

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.cfg.output)


def _items(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_lrs(text: str | None) -> list[float] | None:
    if text is None:
        return None
    if not _items(text):
        raise UserError(f"--lr: {text!r} names no learning rate: pass one or more, comma-separated, e.g. 1e-4,3e-4")
    out = []
    for item in _items(text):
        try:
            lr = float(item)
        except ValueError:
            raise UserError(f"--lr: {item!r} is not a number: pass one or more, comma-separated, e.g. 1e-4,3e-4") from None
        problem = BY_NAME["lr"].problem(lr)
        if problem:
            raise UserError(f"--lr: {problem}")
        out.append(lr)
    return list(dict.fromkeys(out))


def plan_sweep(preset: str | None, overrides: dict, optims: str | None, shadow: str | None,
         lrs: str | None, adapters: str | None = None) -> tuple[Path, list[SweepRun], list[str]]:
    """The runs of a sweep, each config resolved and checked (nothing is loaded).
    ``adapters``: adapter kinds to compare, comma-separated (each with every optimizer)."""
    names = list(dict.fromkeys(_items(optims)))
    kinds = list(dict.fromkeys(_items(adapters)))
    for kind in kinds:
        problem = BY_NAME["adapter"].problem(kind)
        if problem:
            raise UserError(f"--adapter: {problem}")
    if not names:
        raise UserError("--optim: name the optimizers to compare, comma-separated, e.g. emosens,emoairy,emocats")
    if shadow is not None and shadow not in SHADOWS:
        raise UserError(f"--shadow must be one of {', '.join(SHADOWS)}, got {shadow!r}")
    base = resolve_config(preset, overrides)  # the shared settings, checked once
    given = given_values(preset, overrides)
    rates = parse_lrs(lrs) or [base.lr]
    shadows = SHADOWS[shadow] if shadow else (base.shadow,)
    notes, shared = [], {}
    if not (base.val_data or base.val_split):
        shared["val_split"] = DEFAULT_VAL_SPLIT
        notes.append(f"validation: holding out {DEFAULT_VAL_SPLIT:.0%} of the images (choose with --val-data or "
                     "--val-split)")
    if not base.save_every:  # a checkpoint to resume an interrupted run from
        shared["save_every"] = max(1, base.steps // 10)
        notes.append(f"checkpoints every {shared['save_every']} steps, so an interrupted sweep resumes")
    output = Path(base.output).expanduser()
    runs = []
    for kind in kinds or [None]:
        for optim in names:
            # Without --lr on the command line, an optimizer with an lr of its own (Prodigy: 1.0) runs at it.
            own = [DEFAULT_LR[optim]] if not lrs and optim in DEFAULT_LR and base.optim != optim else None
            for s in shadows if optim in EMO else (False,):
                for lr in own or rates:
                    name = sweep_run_name(optim, s, lr if len(rates) > 1 else None)
                    name = f"{kind}-{name}" if len(kinds) > 1 else name
                    values = {**given, **shared, "optim": optim, "shadow": s, "lr": lr, "output": str(output / name),
                              **({"adapter": kind} if kind else {})}
                    runs.append(SweepRun(name, resolve_config(None, values)))
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            twins = [x.cfg for x in runs if x.name == r.name]
            raise UserError(f"--optim {twins[0].optim} and {twins[1].optim} would share the run folder {r.name}: "
                            "compare optimizers whose class names differ, in separate sweeps")
    return output, runs, notes


PER_RUN = ("optim", "shadow", "lr", "output")  # what differs between the runs of one sweep


def _comparable(cfg: dict, shared_only: bool = False) -> dict:
    return {k: v for k, v in cfg.items() if k not in RESUMABLE and not (shared_only and k in PER_RUN)}


def _differing(old: dict, new: dict) -> str | None:
    return next((k for k in old if old[k] != new.get(k)), None)


def check_or_record(output: Path, runs: list[SweepRun]) -> list[str]:
    """A second command on the same folder must describe the same sweep (up to what a
    resume may change), or add runs to it with the same shared settings; sweep.json then
    holds every run planned there, in order. Nothing is written before all is checked.
    -> the names of every run of the sweep."""
    folder = RunFolder(output)
    planned = {r.name: r.cfg.to_dict() for r in runs}
    saved = {}
    if folder.sweep_json.exists():
        saved = read_sweep(folder, "pass another --output for a new sweep")
        for name, old in saved.items():
            new = planned.get(name)
            key = _differing(_comparable(old), _comparable(new)) if new else \
                _differing(_comparable(old, True), _comparable(runs[0].cfg.to_dict(), True))
            if key:
                raise UserError(f"{output} holds a sweep whose run {name} has another {key} ({old.get(key)!r}): pass "
                                "the same flags to resume it or add runs to it, or another --output")
    elif folder.root.is_dir() and any(folder.root.iterdir()):
        raise UserError(f"{output} is not empty and holds no sweep: pass an empty or new --output")
    record = {**saved, **planned}
    write_text(folder.sweep_json, json.dumps({"runs": [{"name": n, "config": c} for n, c in record.items()]},
                                             indent=2) + "\n")
    return list(record)


def state_of(run: SweepRun) -> str:
    """'kept' (finished at its steps), 'resume' (a checkpoint to go on from) or 'start'."""
    folder = run.folder
    try:
        info = run_info(folder.root)
    except UserError:
        info = {}
    if info.get("status") == "finished" and info.get("steps") == run.cfg.steps:
        return "kept"
    return "resume" if list_checkpoints(folder.checkpoints) else "start"


def run_sweep(preset, overrides: dict, optims, shadow, lrs, echo=print, adapters=None) -> str:
    from .train import run_training

    output, runs, notes = plan_sweep(preset, overrides, optims, shadow, lrs, adapters)
    names = check_or_record(output, runs)
    for note in notes:
        echo(note)
    for i, run in enumerate(runs, 1):
        state = state_of(run)
        echo(f"[{i}/{len(runs)}] {run.name}: " + {"kept": "finished earlier, kept", "resume": "resuming",
                                                   "start": "training"}[state])
        if state == "kept":
            continue
        _release_memory()
        try:  # as `sdxl-lora` would: the output folder's lock, leftovers tidied, --resume
            if state == "resume":
                run_training(None, {k: getattr(run.cfg, k) for k in RESUMABLE}, resume=str(run.folder.root))
            else:
                run_training(None, run.cfg.to_dict())
        except TrainingStopped as stop:
            if stop.status == "interrupted":
                raise  # the user stopped the sweep; running it again resumes here
            echo(f"{run.name} stopped: {stop}; the sweep goes on")  # a diverged lr, say
    from ..watch.report import write_report

    folders = [output / n for n in names if _is_run(output / n)]  # runs earlier commands added too
    report = write_report(folders, RunFolder(output).report, title=f"emotrain sweep {output.name}")
    return summary_text(folders) + f"\nreport: {shown(report)}"


def _is_run(folder: Path) -> bool:
    try:
        run_info(folder)
        return True
    except UserError:
        return False


def summary_text(folders: list) -> str:
    from rich.console import Console
    from rich.table import Table
    import io

    from ..watch.runs import load_run

    table = Table(title="sweep: held-out validation loss (fixed noise and timesteps)")
    for col in ("run", "final val loss", "best val loss (step)", "train time", "optimizer state MB"):
        table.add_column(col, justify="left" if col == "run" else "right", no_wrap=col == "run")  # lrs on one line
    for folder in folders:
        row = load_run(folder).summary()
        best = "-" if row["best_val_loss"] is None else f"{row['best_val_loss']:.5g} ({row['best_val_step']})"
        table.add_row(row["run"], "-" if row["final_val_loss"] is None else f"{row['final_val_loss']:.5g}", best,
                      "-" if row["train_seconds"] is None else f"{row['train_seconds']:.0f} s",
                      "-" if row["optimizer_state_bytes"] is None else f"{row['optimizer_state_bytes'] / 1e6:,.1f}")
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(table)
    return console.file.getvalue()


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
