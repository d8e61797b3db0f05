"""What each command does, once the command line is parsed."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

from . import processes
from .checkpoint import list_checkpoints, read_meta
from .config import absolute_paths, check_output_folder, config_from_dict, given_values, resolve_config, resumed_config
from .errors import UserError
from .layout import RunFolder
from .lock import OutputLock
from .tidy import clean_leftovers
from .verify import choose_checkpoint, problem, step_folders


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
    main = processes.is_main()  # under accelerate launch, one process holds the lock and tidies
    with OutputLock(cfg.output) if main else nullcontext() as lock:
        if main:
            if ckpt is None:
                _refuse_other_run(RunFolder(cfg.output), cfg.output)  # again, now that no run can start there
            notes += [lock.message(), clean_leftovers(cfg.output)]
            for note in filter(None, notes):
                print(note, file=sys.stderr)
        from .train import train
        try:
            return train(cfg, resume=ckpt)
        except KeyboardInterrupt:  # before the first step, or a second signal: no checkpoint of this moment
            found = list_checkpoints(RunFolder(cfg.output).checkpoints)
            stop = UserError("stopped at once: nothing of this moment was saved; " + (
                f"the last checkpoint is {found[-1]} (--resume {cfg.output} continues from it)" if found
                else "there is no checkpoint yet"))
            stop.exit_code = 130
            raise stop from None


def run_vram(preset: str | None, overrides: dict, *, both: bool = False, as_json: bool = False,
             measure: bool = False, measure_steps: int = 3) -> str:
    """The memory plan of the run the preset and flags describe. ``--optim`` may name
    several optimizers (or ``all``) and ``--both`` asks for shadow off and on: a
    comparison table. Named nowhere (no preset, no flag), the optimizer and shadow
    default to all of them."""
    optim = overrides.pop("optim", None)
    several = optim is not None and ("," in optim or optim == "all")
    given = given_values(preset, {**overrides, "optim": None if several else optim})
    cfg = resolve_config(preset, {**overrides, "optim": None if several else optim}, needs_data=False,
                         defaults={"model": "sdxl"})
    optims = optim if several else (cfg.optim if "optim" in given else "all")
    # A named optimizer plans the run as configured; none named, the comparison table.
    shadow = "both" if both or not ({"optim", "shadow"} & set(given)) else cfg.shadow
    if measure_steps < 1:
        raise UserError("--measure-steps must be at least 1")
    from . import vram

    if measure:
        if cfg.model == "sdxl" and not _has_gpu():
            print("no GPU: measuring the tiny model at 64 px instead (on a GPU, --model sdxl measures real-size "
                  "SDXL with random weights)", file=sys.stderr)
            cfg = cfg.replace(model="tiny", resolution=64)
        from .progress import TrainProgress
        result = vram.measure(cfg, optims, shadow, steps=measure_steps, progress=TrainProgress(0, every=10))
        return json.dumps(result, indent=2) if as_json else vram.format_measure(result)
    result = vram.plan(cfg, optims, shadow)
    return json.dumps(result, indent=2) if as_json else vram.format_table(result)


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def run_merge(loras: list[str], output: str, model: str | None = None, rank: int | None = None,
              conv_rank: int | None = None, to: str = "kohya", overwrite: bool = False) -> str:
    """With a model: bake the weighted LoRAs into it and write a diffusers SDXL folder.
    Without: combine them into one LoRA file (exactly, or by SVD to ``rank``)."""
    from .formats import get_format, resolve_lora_file
    from .options import MAX_RANK, parse_lora_spec
    from .outputs import lora_output, model_output

    if not loras:
        raise UserError("no LoRA given: pass --lora FILE[:WEIGHT] at least once")
    for spec in loras:  # a bad weight or a missing file is refused before anything loads
        resolve_lora_file(parse_lora_spec(spec)[0])
    if model:
        if rank is not None or conv_rank is not None:
            raise UserError("--rank and --conv-rank apply when combining LoRAs into one file, not when merging "
                            "into a model: drop them")
        folder = model_output(output)
    else:
        for flag, value in (("--rank", rank), ("--conv-rank", conv_rank)):
            if value is not None and not 1 <= value <= MAX_RANK:
                raise UserError(f"{flag} must be from 1 to {MAX_RANK}, got {value}")
        target = lora_output(output, get_format(to).file_name, overwrite)
    from .formats import save_lora_file
    from .stacking import combine, load_weighted, save_merged_pipeline

    weighted = load_weighted(loras)
    if model:
        save_merged_pipeline(model, weighted, folder)
        return f"wrote merged SDXL model to {folder} (loads with StableDiffusionXLPipeline.from_pretrained)"
    combined, report = combine(weighted, rank=rank, conv_rank=conv_rank)
    path = save_lora_file(target, combined, format=to)
    return f"wrote {path}: {report.summary()}"


def run_convert(src: str, dst: str, to: str, overwrite: bool = False) -> str:
    from .formats import convert, get_format, resolve_lora_file
    from .outputs import lora_output

    resolve_lora_file(src)  # the input first: a missing file is the first thing to say
    target = lora_output(dst, get_format(to).file_name, overwrite)
    return f"wrote {convert(src, target, to=to)}"


def run_report(folders: list[str], out: str | None = None) -> str:
    """report.html of one run, of a sweep (its folder) or of several runs overlaid."""
    from pathlib import Path

    from .watch.report import write_report

    if len(folders) == 1 and RunFolder(folders[0]).sweep_json.is_file():
        sweep = RunFolder(folders[0])
        names = [r["name"] for r in json.loads(sweep.sweep_json.read_text())["runs"]]
        runs = [sweep.root / n for n in names if (sweep.root / n).is_dir()]
        if not runs:
            raise UserError(f"sweep {sweep.root} has no run folder yet: run the sweep first")
        path = write_report(runs, out or sweep.report, title=f"emotrain sweep {sweep.root.name}")
    else:
        for folder in folders:
            if not Path(folder).expanduser().is_dir():
                raise UserError(f"run folder {folder} does not exist: pass the --output folder of a run")
        default = RunFolder(folders[0]).report if len(folders) == 1 else Path("report.html")
        path = write_report(folders, out or default)
    return f"wrote {path}"
