"""The command line: parses and delegates. Errors in the user's input end in one line."""

from __future__ import annotations

import json
import shlex
import sys
from enum import Enum
from typing import List, Optional

import typer

from .errors import UserError
from .formats import FORMATS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train SDXL full-layer LoRAs with the Emo optimizer family (EmoSens, EmoAiry, EmoCats).")


class Precision(str, Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


def _split(values: Optional[List[str]]) -> Optional[List[str]]:
    """``--optim-args "a=1 b=2"`` and ``--optim-args a=1 --optim-args b=2`` alike."""
    return None if values is None else [item for v in values for item in shlex.split(v)]


@app.command("sdxl-lora")
def sdxl_lora(
    preset: Optional[str] = typer.Option(None, help="Preset name (see `emotrain presets`) or a .toml file."),
    model: Optional[str] = typer.Option(None, help="Diffusers SDXL folder, hub repo id, .safetensors checkpoint, or 'tiny'."),
    data: Optional[str] = typer.Option(None, help="Folder of images with .txt captions (N_name sub-folders repeat N times), or 'demo'."),
    output: Optional[str] = typer.Option(None, help="Output folder (default: output)."),
    optim: Optional[str] = typer.Option(None, help="emosens, emoairy, emocats, adamw, adamw8bit, adafactor, lion, or package.module.Class."),
    shadow: Optional[bool] = typer.Option(None, "--shadow/--no-shadow", help="Emo shadow-system (one parameter-sized buffer)."),
    optim_args: Optional[List[str]] = typer.Option(None, help="Optimizer keyword arguments, key=value (repeatable)."),
    rank: Optional[int] = typer.Option(None, help="LoRA rank for linear layers and 1x1 convs."),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha (default: the rank)."),
    conv_rank: Optional[int] = typer.Option(None, help="Rank for 3x3 convolutions (default: --rank; 0 turns them off)."),
    conv_alpha: Optional[float] = typer.Option(None, help="Alpha for 3x3 convolutions (default: --alpha)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (Emo family: 2e-4 to 4e-4)."),
    lr_scheduler: Optional[str] = typer.Option(None, help="constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial."),
    warmup_steps: Optional[int] = typer.Option(None),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    batch_size: Optional[int] = typer.Option(None),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step."),
    resolution: Optional[int] = typer.Option(None, help="Training resolution: buckets hold at most resolution^2 pixels."),
    bucket: Optional[bool] = typer.Option(None, "--bucket/--no-bucket", help="Aspect-ratio buckets (default) or square centre crops."),
    mixed_precision: Optional[Precision] = typer.Option(None),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    min_snr_gamma: Optional[float] = typer.Option(None),
    noise_offset: Optional[float] = typer.Option(None),
    max_grad_norm: Optional[float] = typer.Option(None, help="Gradient clipping norm (0: off)."),
    seed: Optional[int] = typer.Option(None),
    train_text_encoders: Optional[bool] = typer.Option(None, "--train-text-encoders/--no-train-text-encoders"),
    save_every: Optional[int] = typer.Option(None, help="Write a checkpoint every N optimizer steps."),
    keep_checkpoints: Optional[int] = typer.Option(None, help="Keep the newest K checkpoints."),
    resume: Optional[str] = typer.Option(None, help="Continue a run: its output folder or a checkpoint folder."),
    network_weights: Optional[str] = typer.Option(None, help="Start from an existing LoRA file (kohya or diffusers)."),
    base_lora: Optional[List[str]] = typer.Option(None, help="FILE[:WEIGHT] merged into the base before training (repeatable)."),
):
    """Train an SDXL full-layer LoRA."""
    overrides = dict(
        model=model, data=data, output=output, optim=optim, shadow=shadow, optim_args=_split(optim_args),
        rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha, lr=lr, lr_scheduler=lr_scheduler,
        warmup_steps=warmup_steps, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
        resolution=resolution, bucket=bucket, mixed_precision=mixed_precision.value if mixed_precision else None,
        gradient_checkpointing=gradient_checkpointing, min_snr_gamma=min_snr_gamma, noise_offset=noise_offset,
        max_grad_norm=max_grad_norm, seed=seed, train_text_encoders=train_text_encoders, save_every=save_every,
        keep_checkpoints=keep_checkpoints, network_weights=network_weights, base_lora=base_lora)
    from .commands import run_training
    try:
        run_training(preset, overrides, resume)
    except UserError as exc:
        _fail(exc)


@app.command("presets")
def presets():
    """List the shipped presets."""
    from .config import preset_names, read_preset
    for name in preset_names():
        table, _ = read_preset(name)
        typer.echo(f"{name:16s} {table.get('optim', '')} shadow={table.get('shadow', False)} "
                   f"rank={table.get('rank', '')} lr={table.get('lr', '')}")


LoraFormat = Enum("LoraFormat", {name: name for name in FORMATS}, type=str)  # the registry's names
FORMAT_HELP = "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())


@app.command("vram")
def vram(
    model: str = typer.Option("sdxl", help="'sdxl' (SDXL 1.0 base config, no weights needed), 'tiny', or a diffusers folder."),
    rank: int = typer.Option(16, help="LoRA rank."),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha (no effect on memory)."),
    conv_rank: Optional[int] = typer.Option(None, help="Rank for 3x3 convolutions (default: --rank)."),
    optim: str = typer.Option("all", help="Comma-separated optimizers, or 'all'."),
    shadow: Optional[bool] = typer.Option(None, "--shadow/--no-shadow", help="Emo rows with or without the shadow-system."),
    both: bool = typer.Option(False, "--both", help="Emo rows with and without the shadow-system (the default)."),
    mixed_precision: Precision = typer.Option(Precision.no, help="Precision of the frozen base weights."),
    train_text_encoders: bool = typer.Option(False, "--train-text-encoders", help="Count text-encoder LoRAs too."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    measure: bool = typer.Option(False, "--measure", help="Also run real steps per optimizer and compare."),
    steps: int = typer.Option(3, help="Steps per optimizer with --measure."),
):
    """Plan (and optionally measure) memory per optimizer for a LoRA run."""
    from . import vram as planner
    shadow_mode = "both" if both or shadow is None else shadow
    try:
        if measure:
            if model == "sdxl" and not _has_gpu():
                typer.echo("no GPU: measuring on the tiny model (on a GPU, --model sdxl measures real-size SDXL)", err=True)
                model = "tiny"
            result = planner.measure(model=model, optims=optim,
                                     steps=steps, rank=rank, alpha=alpha, conv_rank=conv_rank, shadow=shadow_mode,
                                     mixed_precision=mixed_precision.value)
            typer.echo(json.dumps(result, indent=2) if as_json else planner.format_measure(result))
            return
        result = planner.plan(model, rank, alpha, conv_rank, None, optim, shadow_mode, mixed_precision.value,
                              train_text_encoders)
        typer.echo(json.dumps(result, indent=2) if as_json else planner.format_table(result))
    except UserError as exc:
        _fail(exc)


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


@app.command("merge")
def merge(
    lora: List[str] = typer.Option(..., help="LoRA file with an optional weight, FILE[:WEIGHT] (repeatable)."),
    output: str = typer.Option(..., help="With --model: a folder for the merged model; else the combined LoRA file."),
    model: Optional[str] = typer.Option(None, help="Bake the LoRAs into this SDXL model (folder, hub id, file, tiny)."),
    rank: Optional[int] = typer.Option(None, help="Re-factor the combined LoRA to this rank by SVD (default: exact)."),
    conv_rank: Optional[int] = typer.Option(None, help="Rank for 3x3 convolutions with --rank (default: --rank)."),
    to: LoraFormat = typer.Option(LoraFormat["kohya"], help=f"Format of a combined LoRA file ({FORMAT_HELP})."),
):
    """Stack LoRAs: bake them into a base model, or combine them into one LoRA."""
    from .commands import run_merge
    try:
        typer.echo(run_merge(lora, output, model=model, rank=rank, conv_rank=conv_rank, to=to.value))
    except UserError as exc:
        _fail(exc)


@app.command("convert")
def convert(
    src: str = typer.Argument(..., help=f"A LoRA file ({' or '.join(FORMATS)})."),
    dst: str = typer.Argument(..., help="Where to write it."),
    to: LoraFormat = typer.Option(..., help=f"Target format ({FORMAT_HELP})."),
):
    """Convert a LoRA file to another format (a DST without .safetensors is a folder)."""
    from .commands import run_convert
    try:
        typer.echo(run_convert(src, dst, to.value))
    except UserError as exc:
        _fail(exc)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
