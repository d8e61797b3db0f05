"""Sample prompts: ``--sample-prompt`` and prompt files in kohya sd-scripts' syntax.

One prompt a line; ``#`` starts a comment line; options follow the prompt, each
introduced by `` --``: ``--n`` negative prompt, ``--w``/``--h`` size in pixels, ``--d``
seed, ``--s`` steps, ``--l`` CFG scale, ``--ss`` sampler. A line emotrain cannot honour
(an unknown option or one given twice, a number not written in ASCII digits, not finite
or out of the range its option takes, a size the model cannot take) is refused naming
its line. Pure Python: checked before torch is imported.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError
from ..samplers import NAMES as SAMPLERS

DEFAULT_CFG = 7.0
SIZE_STEP = 32  # the VAE's 8x times the UNet's two halvings: latents divide by 4
PROMPT_OPTIONS = {"n": "negative prompt", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "CFG scale",
           "ss": "sampler"}


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str
    width: int
    height: int
    seed: int
    steps: int
    cfg: float
    sampler: str

    def to_dict(self) -> dict:
        return asdict(self)


def parse_line(line: str, where: str, *, resolution: int, seed: int, steps: int, sampler: str) -> SamplePrompt:
    """One prompt line -> SamplePrompt; ``where`` names the line in errors."""
    prompt, *parts = line.split(" --")
    prompt = prompt.strip()
    if not prompt:
        raise UserError(f"{where}: no prompt before the options: write the prompt first, then --n/--w/--h/--d/--s/--l")
    values = {"negative": "", "width": resolution, "height": resolution, "seed": seed, "steps": steps,
              "cfg": DEFAULT_CFG, "sampler": sampler}
    given = set()
    for part in parts:
        key, _, value = part.strip().partition(" ")
        value = value.strip()
        if key not in PROMPT_OPTIONS:
            raise UserError(f"{where}: unknown option --{key}: use --n, --w, --h, --d, --s, --l or --ss")
        if key in given:
            raise UserError(f"{where}: --{key} ({PROMPT_OPTIONS[key]}) is given twice: keep one")
        given.add(key)
        if not value:
            raise UserError(f"{where}: --{key} ({PROMPT_OPTIONS[key]}) has no value")
        if key == "n":
            values["negative"] = value
        elif key == "ss":
            if value not in SAMPLERS:
                raise UserError(f"{where}: unknown sampler {value!r}: use one of {', '.join(SAMPLERS)}")
            values["sampler"] = value
        else:
            name, number = _number(key, value, where)
            values[name] = number
    return SamplePrompt(prompt, **values)


# key -> (field, type, least, most, step): the ranges the matching options take
# (--seed, --sample-steps, --resolution's largest size); CFG 0 to 100.
NUMBERS = {"w": ("width", int, SIZE_STEP, 8192, SIZE_STEP), "h": ("height", int, SIZE_STEP, 8192, SIZE_STEP),
           "d": ("seed", int, 0, 2**32 - 1, 1), "s": ("steps", int, 1, 1000, 1), "l": ("cfg", float, 0, 100, None)}
WHOLE = re.compile(r"[+-]?[0-9]+", re.ASCII)
DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)


def _number(key: str, value: str, where: str) -> tuple[str, int | float]:
    """A prompt option's number, written in ASCII digits (``str.isdigit`` and Python's
    int/float also take '²', '١٢', '1_0' and 'nan'), finite and in its option's range."""
    field, kind, least, most, step = NUMBERS[key]
    what, shown = f"--{key} ({PROMPT_OPTIONS[key]})", value if len(value) <= 24 else value[:20] + "..."
    if kind is int:
        if not WHOLE.fullmatch(value):
            raise UserError(f"{where}: {what} must be a whole number written in digits 0-9, got {shown!r}")
        number = int(value) if len(value) <= 40 else math.inf  # int() refuses 4300 digits and more
    else:
        if not DECIMAL.fullmatch(value) or not math.isfinite(float(value)):
            raise UserError(f"{where}: {what} must be a finite number such as 7 or 6.5, got {shown!r}")
        number = float(value)
    if not least <= number <= most:
        raise UserError(f"{where}: {what} {shown}: {PROMPT_OPTIONS[key]} must be {least} to {most}")
    if step and number % step:
        raise UserError(f"{where}: {what} {number}: sizes must be multiples of {step} (at least {least})")
    return field, number


def read_prompt_file(path: str | Path) -> list[tuple[int, str]]:
    """(line number, text) of every prompt line of a file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"sample_prompts: file {path} does not exist: pass a text file with one prompt a line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"sample_prompts: cannot read {path} ({exc}): pass a UTF-8 text file") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def sample_prompts(cfg) -> list[SamplePrompt]:
    """Every prompt the run samples, in order: the file's lines, then each
    ``--sample-prompt``. A prompt without ``--d`` gets the run's seed plus its index, so
    each prompt keeps its noise from one sample step to the next."""
    lines = []
    if cfg.sample_prompts:
        lines += [(f"{cfg.sample_prompts} line {n}", text) for n, text in read_prompt_file(cfg.sample_prompts)]
    lines += [(f"--sample-prompt {text if len(text) <= 40 else text[:37] + '...'!r}", text)
              for text in cfg.sample_prompt]
    return [parse_line(text, where, resolution=cfg.resolution, seed=cfg.seed + k, steps=cfg.sample_steps,
                       sampler=cfg.sample_sampler) for k, (where, text) in enumerate(lines)]
