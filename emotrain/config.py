"""The training configuration: ``TrainConfig`` built from the option declarations
(options.py), filled from defaults, a preset (TOML) and the command line, and checked
before any model is loaded. Pure Python: no torch here."""

from __future__ import annotations

import dataclasses
import tomllib
from importlib import resources
from pathlib import Path

from .errors import UserError
from .options import BY_NAME, OPTIONS, RESUMABLE, Option, parse_lora_spec


class _Derived:
    """Values that default to another option's."""

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def effective_conv_rank(self) -> int:
        return self.rank if self.conv_rank is None else self.conv_rank

    @property
    def effective_conv_alpha(self) -> float:
        return float(self.effective_alpha if self.conv_alpha is None else self.conv_alpha)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _field(o: Option):
    annotation = {list: "list[str]"}.get(o.type, o.type.__name__)
    if o.nullable or o.default is None:
        annotation += " | None"
    default = dataclasses.field(default_factory=lambda d=o.default: list(d)) if o.type is list \
        else dataclasses.field(default=o.default)
    return o.name, annotation, default


TrainConfig = dataclasses.make_dataclass("TrainConfig", [_field(o) for o in OPTIONS], bases=(_Derived,))
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = "One run's settings; the fields are emotrain.options.OPTIONS."


def coerce(o: Option, value, where: str):
    """Check one value's type against its declaration; ints are fine for floats."""
    if value is None and (o.nullable or o.default is None):
        return None
    if o.type is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{o.name} {where} must be a list of strings, got {value!r}")
        return list(value)
    if o.type is bool and isinstance(value, bool):
        return value
    if o.type is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if o.type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if o.type is str and isinstance(value, str):
        return value
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[o.type]
    raise UserError(f"{o.name} {where} must be {kind}, got {value!r}")


def validate(cfg: TrainConfig, needs_data: bool = True) -> None:
    """Every value against its declaration, then what only the whole config can say."""
    def bad(key, problem):
        raise UserError(f"{key}: {problem}")

    for o in OPTIONS:
        problem = o.problem(getattr(cfg, o.name))
        if problem:
            bad(o.name, f"{problem} {o.hint}".rstrip())
    if not cfg.model:
        bad("model", "no model given: pass --model PATH|REPO_ID|tiny or a preset that sets it")
    if needs_data:
        if not cfg.data:
            bad("data", "no training data given: pass --data DIR (images with .txt captions) or --data demo")
        if cfg.data != "demo" and not Path(cfg.data).expanduser().is_dir():
            bad("data", f"folder {cfg.data} does not exist: pass an existing folder of images, or --data demo")
    if cfg.targets == "transformer" and cfg.conv_rank:
        bad("conv_rank", "--targets transformer has no convolutions: drop --conv-rank or use --targets full")
    if cfg.network_weights and not Path(cfg.network_weights).expanduser().is_file():
        bad("network_weights", f"file {cfg.network_weights} does not exist: pass an existing LoRA .safetensors")
    for spec in cfg.base_lora:
        path, _ = parse_lora_spec(spec)
        if not Path(path).expanduser().exists():
            bad("base_lora", f"file {path} does not exist: pass FILE.safetensors[:WEIGHT]")
    validate_watch(cfg, bad)


def validate_watch(cfg: TrainConfig, bad) -> None:
    """Validation, samples and logging: what can be known before a model is loaded."""
    from .watch.prompts import read_prompt_file, sample_prompts

    if cfg.val_data and cfg.val_split:
        bad("val_split", "--val-data and --val-split both given: validate on a folder or on held-out images, not both")
    if cfg.val_data and cfg.val_data != "demo" and not Path(cfg.val_data).expanduser().is_dir():
        bad("val_data", f"folder {cfg.val_data} does not exist: pass an existing folder of images")
    if cfg.val_every is not None and not (cfg.val_data or cfg.val_split):
        bad("val_every", "no validation images: add --val-data DIR or --val-split F (e.g. 0.1)")
    if cfg.sample_prompts and not read_prompt_file(cfg.sample_prompts):
        bad("sample_prompts", f"{cfg.sample_prompts} holds no prompt: write one prompt a line")
    sample_prompts(cfg)  # every line checked now, not at the first sample
    if cfg.sample_every is not None and not (cfg.sample_prompts or cfg.sample_prompt):
        bad("sample_every", "no prompts to sample: add --sample-prompt \"...\" or --sample-prompts FILE")
    if cfg.log_with != "none":
        import importlib.util
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[cfg.log_with]
        if importlib.util.find_spec(module) is None:
            bad("log_with", f"{cfg.log_with} is not installed: pip install {module}, or pass --log-with none")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("emotrain.presets").iterdir() if p.name.endswith(".toml"))


def read_preset(preset: str) -> tuple[dict, str]:
    """A preset by name (shipped with emotrain) or by path -> (raw table, where it came from)."""
    path = Path(preset).expanduser()
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"preset file {preset} does not exist: pass an existing .toml or one of: {', '.join(preset_names())}")
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        res = resources.files("emotrain.presets").joinpath(f"{preset}.toml")
        if not res.is_file():
            raise UserError(f"unknown preset {preset!r}: use one of {', '.join(preset_names())} or a .toml path")
        text, where = res.read_text(encoding="utf-8"), f"preset {preset}"
    try:
        return tomllib.loads(text), where
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{where} is not valid TOML ({exc}): fix the file") from None


def check_keys(table: dict, where: str) -> dict:
    out = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in BY_NAME:
            raise UserError(f"unknown key {raw_key!r} in {where}: valid keys are {', '.join(BY_NAME)}")
        out[key] = coerce(BY_NAME[key], value, f"in {where}")
    return out


def given_values(preset: str | None, overrides: dict | None) -> dict:
    """What the preset and the command line set (the command line wins), checked for type."""
    values = {}
    if preset:
        table, where = read_preset(preset)
        values.update(check_keys(table, where))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = coerce(BY_NAME[key], value, "on the command line")
    return values


def resolve_config(preset: str | None = None, overrides: dict | None = None, needs_data: bool = True,
                   defaults: dict | None = None) -> TrainConfig:
    """The declared defaults (or ``defaults``), then the preset, then the command line."""
    cfg = TrainConfig(**{**(defaults or {}), **given_values(preset, overrides)})
    validate(cfg, needs_data=needs_data)
    return cfg


def config_from_dict(values: dict) -> TrainConfig:
    """A config written by an earlier run (run.json, a checkpoint)."""
    return TrainConfig(**check_keys(values, "saved config"))


def resumed_config(saved: TrainConfig, overrides: dict) -> TrainConfig:
    """The checkpoint's config with the command line's changes, where a resumed run may
    change them (options declared ``resumable``); anything else is refused by name."""
    changed = {}
    for key, value in overrides.items():
        if value is None or value == getattr(saved, key):
            continue
        if key not in RESUMABLE:
            raise UserError(f"{BY_NAME[key].cli_name} differs from the checkpoint's ({getattr(saved, key)!r}): "
                            f"a resumed run keeps its config; only {', '.join(RESUMABLE)} may change")
        changed[key] = value
    return resolve_config(None, {**saved.to_dict(), **changed})
