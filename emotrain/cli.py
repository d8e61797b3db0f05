"""The command line: parses and delegates. Errors in the user's input end in one line.

``sdxl-lora`` and ``vram`` take their training options from the one declaration in
options.py: each declared option becomes a flag, in its help panel, with its default
shown; the command bodies only hand the values on.
"""

from __future__ import annotations

import inspect
import json
import shlex
import sys
from enum import Enum
from typing import List, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .run import processes
from .errors import UserError
from .options import OPTIONS, Option
from .lora.formats import FORMATS
from .quiet import hide_bitsandbytes

hide_bitsandbytes()  # until an 8-bit optimizer asks for it (quiet.py)

MAX_HELP_WIDTH = 100
# click's exception classes, wherever this typer takes click from (newer ones vendor it).
click_exceptions = sys.modules[typer.BadParameter.__module__]


class OneLineErrors(TyperGroup):
    """Command-line mistakes (a bad number, an unknown flag) end in one line and exit
    code 2, like every other input error, instead of click's usage box."""

    def main(self, args=None, *rest, **kwargs):
        kwargs["standalone_mode"] = False
        args = spread_number_lists(list(sys.argv[1:] if args is None else args))
        try:
            code = super().main(args, *rest, **kwargs)
        except click_exceptions.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help())
            sys.exit(0)
        except click_exceptions.ClickException as exc:
            command = f" (see: emotrain {exc.ctx.info_name} --help)" if getattr(exc, "ctx", None) and \
                exc.ctx.parent else " (see: emotrain --help)"
            message = " ".join(exc.format_message().split())
            typer.echo(f"error: {message}{command}", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def spread_number_lists(argv: list[str]) -> list[str]:
    """``--text-encoder-lr 1e-4 2e-4`` read as ``--text-encoder-lr 1e-4 --text-encoder-lr
    2e-4``: click has no options of a varying count of values, and ``sdxl-lora`` and
    ``vram`` take no arguments of their own, so numbers after such an option's value can
    only be its further values (too many are refused by the option's own check)."""
    if not argv or argv[0] not in ("sdxl-lora", "vram"):
        return argv
    flags = {o.cli_name for o in OPTIONS if o.items}
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        out.append(token)
        i += 1
        flag, equals, _ = token.partition("=")
        if flag not in flags or token == "--":
            continue
        if not equals and i < len(argv):
            out.append(argv[i])
            i += 1
        while i < len(argv) and _is_number(argv[i]):
            out += [flag, argv[i]]
            i += 1
    return out


class GroupedHelp(TyperCommand):
    """Plain click help (it wraps to any terminal and never cuts a flag name), with the
    options under their panels: model, data, LoRA, optimizer, ..."""

    def format_options(self, ctx, formatter):
        panels: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
        for name, rows in panels.items():
            with formatter.section(name):
                formatter.write_dl(rows)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  context_settings={"max_content_width": MAX_HELP_WIDTH},
                  help="Train SDXL full-layer LoRAs with the Emo optimizer family (EmoSens, EmoAiry, EmoCats).")


def _fail(exc: Exception) -> None:
    # Under accelerate launch every process ends the same way: the main one speaks for a
    # stop they agreed on; anything else a process says is marked with its rank.
    rank = processes.rank()
    if rank == 0:
        typer.echo(f"error: {exc}", err=True)
    elif not hasattr(exc, "status") or getattr(exc, "alone", False):  # alone: a survivor of a lost process
        typer.echo(f"error [process {rank}]: {exc}", err=True)
    raise typer.Exit(getattr(exc, "exit_code", 2))


# -- options from the declaration ------------------------------------------------------

_ANNOTATIONS = {bool: Optional[bool], int: Optional[int], float: Optional[float], str: Optional[str],
                list: Optional[List[str]]}


def _metavar(o: Option) -> str | None:
    if o.choices and o.name != "optim":
        return "[" + "|".join(o.choices) + "]"
    return {int: "INT", float: "FLOAT", str: "TEXT", list: "TEXT"}.get(o.type)


def _parameter(o: Option, panel: str | None = None) -> inspect.Parameter:
    # The default is shown in the help text: the parameter's own default must stay None,
    # which tells "not given" (a preset's value stands) from "given".
    shown = o.shown_default()
    help_text = o.help + ("" if shown == "-" else f" [default: {shown}]")
    info = typer.Option(None, *o.flags.split(" "), help=help_text, rich_help_panel=panel or o.group,
                        show_default=False, metavar=_metavar(o))
    return inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=_ANNOTATIONS[o.type])


def _extra(name: str, annotation, info) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def with_options(first: list[inspect.Parameter], last: list[inspect.Parameter] = (), panel_of=lambda o: None,
                 skip: tuple = ()):
    """Give a ``**values`` command one flag per declared option (plus its own ones;
    ``skip``: options the command declares its own way)."""
    def decorate(func):
        params = list(first) + [_parameter(o, panel_of(o)) for o in OPTIONS if o.name not in skip] + list(last)
        func.__signature__ = inspect.Signature(params)
        func.__annotations__ = {p.name: p.annotation for p in params}
        return func
    return decorate


def overrides_from(values: dict) -> dict:
    """Command-line values by option name; None where the flag was not given."""
    out = {}
    for o in OPTIONS:
        value = values.get(o.name)
        if o.type is list:  # a repeatable flag given no times is "not given", not "empty"
            value = None if not value else value
            if value is not None and o.split:
                try:  # ``--optim-args "a=1 b=2"`` and ``--optim-args a=1 --optim-args b=2`` alike
                    value = [item for v in value for item in shlex.split(v)]
                except ValueError as exc:
                    raise UserError(f"{o.name}: cannot split {value!r} ({exc}): balance the quotes") from None
                if o.items and not value:
                    raise UserError(f"{o.name}: is empty: give a number, or leave the option out")
        out[o.name] = value
    return out


PRESET = _extra("preset", Optional[str], typer.Option(
    None, metavar="NAME|FILE", help="Preset name (see `emotrain presets`) or a .toml file; flags override it.", rich_help_panel="Model"))


# -- commands --------------------------------------------------------------------------

@app.command("sdxl-lora", cls=GroupedHelp)
@with_options([PRESET], [_extra("resume", Optional[str], typer.Option(
    None, metavar="FOLDER", help="Continue a run: its output folder or a checkpoint folder.", rich_help_panel="Checkpoints"))])
def sdxl_lora(**values):
    """Train an SDXL full-layer LoRA."""
    from .commands.train import run_training
    try:
        run_training(values.pop("preset"), overrides_from(values), values.pop("resume"))
    except UserError as exc:
        _fail(exc)


@app.command("presets")
def presets():
    """List the shipped presets."""
    from .config import preset_names, read_preset
    for name in preset_names():
        table, _ = read_preset(name)
        typer.echo(f"{name:16s} {table.get('optim', '')} shadow={table.get('shadow', False)} "
                   f"adapter={table.get('adapter', 'lora')} rank={table.get('rank', '')} lr={table.get('lr', '')}")


OTHER_PANEL = "Other training options (accepted, no effect on memory)"


@app.command("vram", cls=GroupedHelp)
@with_options([PRESET], [
    _extra("both", bool, typer.Option(False, "--both", help="Emo rows with and without the shadow-system.",
                                      rich_help_panel="Table")),
    _extra("as_json", bool, typer.Option(False, "--json", help="Print JSON instead of a table.",
                                         rich_help_panel="Table")),
    _extra("measure", bool, typer.Option(False, "--measure", help="Also run real steps per optimizer and compare "
                                         "(on a GPU: real-size SDXL with random weights; else the tiny model).",
                                         rich_help_panel="Table")),
    _extra("measure_steps", int, typer.Option(3, help="Steps per optimizer with --measure.", rich_help_panel="Table")),
    _extra("gpu_memory", Optional[str], typer.Option(
        None, metavar="GIB|cuda[:N]", rich_help_panel="Table",
        help="A card's memory in GiB (or cuda[:N]: this machine's device): says whether the run fits, and "
             "if not, the cheapest changes that make it fit, each with its planned peak.")),
], panel_of=lambda o: None if o.memory else OTHER_PANEL)
def vram(**values):
    """Plan (and optionally measure) the memory of the run these flags describe, per optimizer.

    Takes the same preset and flags as sdxl-lora; --optim also takes 'all' or a
    comma-separated list for a comparison table. Without --model it plans SDXL 1.0 from
    its shipped configs (no weights needed)."""
    from .commands.vram import run_vram
    try:
        typer.echo(run_vram(values.pop("preset"), overrides_from(values), both=values.pop("both"),
                            as_json=values.pop("as_json"), measure=values.pop("measure"),
                            measure_steps=values.pop("measure_steps"), gpu_memory=values.pop("gpu_memory")))
    except UserError as exc:
        _fail(exc)


@app.command("sweep", cls=GroupedHelp)
@with_options([_extra("optim", Optional[str], typer.Option(
                   None, metavar="A,B,...", rich_help_panel="Sweep",
                   help="Optimizers to compare, comma-separated (emosens, emoairy, emocats, adamw, ...).")),
               _extra("shadow", Optional[str], typer.Option(
                   None, metavar="[off|on|both]", rich_help_panel="Sweep",
                   help="Emo shadow-system: off, on, or both (each Emo optimizer twice). [default: the preset's, "
                        "else off]")),
               _extra("lr", Optional[str], typer.Option(
                   None, metavar="X,Y,...", rich_help_panel="Sweep",
                   help="One or more learning rates, comma-separated: every optimizer runs with each.")),
               _extra("adapter", Optional[str], typer.Option(
                   None, metavar="A,B,...", rich_help_panel="Sweep",
                   help="Adapter kinds to compare, comma-separated (lora, dora, loha, lokr): each runs with every "
                        "optimizer, into OUTPUT/<adapter>-<optim>/. [default: the preset's, else lora]")),
               PRESET],
              skip=("optim", "shadow", "lr", "adapter"))
def sweep(**values):
    """Train the same LoRA with several optimizers, one after another, on the same data,
    seed, noise and validation set, into OUTPUT/<optim>[-shadow][-lr<x>]/, then write
    OUTPUT/report.html comparing them. Running the same command again resumes it.

    Takes every sdxl-lora flag. Without --val-data/--val-split it holds out 10% of the
    images for validation; without --save-every it checkpoints every 10% of the steps."""
    from .commands.sweep import run_sweep
    optims, shadow, lrs, adapters = values.pop("optim"), values.pop("shadow"), values.pop("lr"), values.pop("adapter")
    try:
        typer.echo(run_sweep(values.pop("preset"), overrides_from(values), optims, shadow, lrs, echo=typer.echo,
                             adapters=adapters))
    except UserError as exc:
        _fail(exc)


@app.command("report")
def report(
    runs: List[str] = typer.Argument(..., metavar="RUN...", help="Run output folders (or one sweep folder)."),
    out: Optional[str] = typer.Option(None, help="Where to write the page [default: RUN/report.html for one run, "
                                                 "./report.html for several]."),
):
    """Write report.html: loss, validation loss, lr, emotion scalar, memory and samples of
    a run, or of several runs overlaid (curves on shared axes, samples side by side)."""
    from .commands.report import run_report
    try:
        typer.echo(run_report(runs, out))
    except UserError as exc:
        _fail(exc)


LoraFormat = Enum("LoraFormat", {name: name for name in FORMATS}, type=str)  # the registry's names
FORMAT_HELP = "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())


@app.command("merge")
def merge(
    lora: List[str] = typer.Option(..., help="LoRA file with an optional weight, FILE[:WEIGHT] (repeatable)."),
    output: str = typer.Option(..., help="With --model: a folder for the merged model; else the combined LoRA file."),
    model: Optional[str] = typer.Option(None, help="Bake the LoRAs into this SDXL model (folder, hub id, file, tiny)."),
    rank: Optional[int] = typer.Option(None, help="Re-factor the combined LoRA to this rank by SVD (default: exact)."),
    conv_rank: Optional[int] = typer.Option(None, help="Rank for 3x3 convolutions with --rank (default: --rank)."),
    to: LoraFormat = typer.Option(LoraFormat["kohya"], help=f"Format of a combined LoRA file ({FORMAT_HELP})."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file (never a folder)."),
):
    """Stack LoRAs: bake them into a base model, or combine them into one LoRA."""
    from .commands.lora import run_merge
    try:
        typer.echo(run_merge(lora, output, model=model, rank=rank, conv_rank=conv_rank, to=to.value,
                             overwrite=overwrite))
    except UserError as exc:
        _fail(exc)


@app.command("convert")
def convert(
    src: str = typer.Argument(..., help=f"A LoRA file ({' or '.join(FORMATS)})."),
    dst: str = typer.Argument(..., help="Where to write it."),
    to: LoraFormat = typer.Option(..., help=f"Target format ({FORMAT_HELP})."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file (never a folder)."),
):
    """Convert a LoRA file to another format (a DST without .safetensors is a folder)."""
    from .commands.lora import run_convert
    try:
        typer.echo(run_convert(src, dst, to.value, overwrite=overwrite))
    except UserError as exc:
        _fail(exc)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
