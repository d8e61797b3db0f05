"""Sample prompts: ``--sample-prompt`` and prompt files in kohya sd-scripts' syntax.

One prompt a line; ``#`` starts a comment line; options follow the prompt, each
introduced by `` --``: ``--n`` negative prompt, ``--w``/``--h`` size in pixels, ``--d``
seed, ``--s`` steps, ``--l`` CFG scale, ``--ss`` sampler. A line emotrain cannot honour
(an unknown option, a value that is not a number, a size the model cannot take) is
refused naming its line. Pure Python: checked before torch is imported.
"""

from __future__ import annotations

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
    for part in parts:
        key, _, value = part.strip().partition(" ")
        value = value.strip()
        if key not in PROMPT_OPTIONS:
            raise UserError(f"{where}: unknown option --{key}: use --n, --w, --h, --d, --s, --l or --ss")
        if not value:
            raise UserError(f"{where}: --{key} ({PROMPT_OPTIONS[key]}) has no value")
        if key == "n":
            values["negative"] = value
        elif key == "ss":
            if value not in SAMPLERS:
                raise UserError(f"{where}: unknown sampler {value!r}: use one of {', '.join(SAMPLERS)}")
            values["sampler"] = value
        elif key == "l":
            try:
                values["cfg"] = float(value)
            except ValueError:
                raise UserError(f"{where}: --l (CFG scale) must be a number, got {value!r}") from None
        else:
            if not value.isdigit():
                raise UserError(f"{where}: --{key} ({PROMPT_OPTIONS[key]}) must be a whole number, got {value!r}")
            number = int(value)
            if key in "wh":
                if number < SIZE_STEP or number % SIZE_STEP:
                    raise UserError(f"{where}: --{key} {number}: sizes must be multiples of {SIZE_STEP} (at least "
                                    f"{SIZE_STEP})")
                values["width" if key == "w" else "height"] = number
            elif key == "s":
                if not 1 <= number <= 1000:
                    raise UserError(f"{where}: --s {number}: steps must be 1 to 1000")
                values["steps"] = number
            else:
                values["seed"] = number
    return SamplePrompt(prompt, **values)


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
    lines += [(f"--sample-prompt {text!r}", text) for text in cfg.sample_prompt]
    return [parse_line(text, where, resolution=cfg.resolution, seed=cfg.seed + k, steps=cfg.sample_steps,
                       sampler=cfg.sample_sampler) for k, (where, text) in enumerate(lines)]
