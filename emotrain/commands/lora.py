"""``emotrain merge`` and ``emotrain convert``: LoRA files in, a LoRA file or a merged
model out. Inputs are checked before anything loads; outputs never replace a folder."""

from __future__ import annotations

from ..errors import UserError


def run_merge(loras: list[str], output: str, model: str | None = None, rank: int | None = None,
              conv_rank: int | None = None, to: str = "kohya", overwrite: bool = False) -> str:
    """With a model: bake the weighted LoRAs into it and write a diffusers SDXL folder.
    Without: combine them into one LoRA file (exactly, or by SVD to ``rank``)."""
    from ..lora.formats import get_format, resolve_lora_file
    from ..options import MAX_RANK, parse_lora_spec
    from ..disk.outputs import lora_output, model_output

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
    from ..lora.formats import save_lora_file
    from ..lora.stacking import combine, load_weighted, save_merged_pipeline

    weighted = load_weighted(loras)
    if model:
        save_merged_pipeline(model, weighted, folder)
        return f"wrote merged SDXL model to {folder} (loads with StableDiffusionXLPipeline.from_pretrained)"
    combined, report = combine(weighted, rank=rank, conv_rank=conv_rank)
    path = save_lora_file(target, combined, format=to)
    return f"wrote {path}: {report.summary()}"


def run_convert(src: str, dst: str, to: str, overwrite: bool = False) -> str:
    from ..lora.formats import convert, get_format, resolve_lora_file
    from ..disk.outputs import lora_output

    resolve_lora_file(src)  # the input first: a missing file is the first thing to say
    target = lora_output(dst, get_format(to).file_name, overwrite)
    return f"wrote {convert(src, target, to=to)}"
