"""The training configuration: defaults, presets (TOML) and command-line overrides,
checked before any model is loaded."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import UserError
from .optimizers import NAMES as OPTIMIZERS
from .stacking import parse_lora_spec

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    model: str | None = None
    data: str | None = None
    output: str = "output"
    optim: str = "emoairy"
    shadow: bool = False
    optim_args: list[str] = field(default_factory=list)
    rank: int = 16
    alpha: float | None = None  # None: same as rank (scale 1)
    conv_rank: int | None = None  # None: same as rank
    conv_alpha: float | None = None  # None: same as alpha
    lr: float = 3e-4
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    resolution: int = 1024
    bucket: bool = True  # aspect-ratio buckets; False: centre-crop every image to a square
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    seed: int = 42
    train_text_encoders: bool = False
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 3
    network_weights: str | None = None
    base_lora: list[str] = field(default_factory=list)

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


KEYS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value, where: str):
    """Check one value against the field's declared type; ints are fine for floats."""
    hint = typing.get_type_hints(TrainConfig)[key]
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if is_union else ()
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if is_union else hint
    if value is None and optional:
        return None
    origin = typing.get_origin(base)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{key} {where} must be a list of strings, got {value!r}")
        return list(value)
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[base]
    raise UserError(f"{key} {where} must be {kind}, got {value!r}")


def _validate(cfg: TrainConfig, needs_data: bool = True) -> None:
    def bad(key, problem):
        raise UserError(f"{key}: {problem}")

    if not cfg.model:
        bad("model", "no model given: pass --model PATH|REPO_ID|tiny or a preset that sets it")
    if needs_data:
        if not cfg.data:
            bad("data", "no training data given: pass --data DIR (images with .txt captions) or --data demo")
        if cfg.data != "demo" and not Path(cfg.data).expanduser().is_dir():
            bad("data", f"folder {cfg.data} does not exist: pass an existing folder of images, or --data demo")
    if cfg.optim not in OPTIMIZERS and "." not in cfg.optim:
        bad("optim", f"unknown optimizer {cfg.optim!r}: use one of {', '.join(OPTIMIZERS)} or package.module.Class")
    for key in ("rank", "steps", "batch_size", "grad_accum", "resolution"):
        if getattr(cfg, key) < 1:
            bad(key, f"must be at least 1, got {getattr(cfg, key)}")
    if cfg.conv_rank is not None and cfg.conv_rank < 0:
        bad("conv_rank", "must be 0 (no 3x3 conv LoRA) or more")
    if cfg.resolution % 32 or cfg.resolution < 64:
        bad("resolution", f"must be a multiple of 32 and at least 64 (the VAE and UNet scales), got {cfg.resolution}")
    for key in ("alpha", "conv_alpha"):
        if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
            bad(key, f"must be positive, got {getattr(cfg, key)}")
    if not cfg.lr > 0:
        bad("lr", f"must be positive, got {cfg.lr} (the Emo family works well at 2e-4 to 4e-4)")
    if cfg.lr_scheduler not in SCHEDULERS:
        bad("lr_scheduler", f"unknown scheduler {cfg.lr_scheduler!r}: use one of {', '.join(SCHEDULERS)}")
    if cfg.mixed_precision not in PRECISIONS:
        bad("mixed_precision", f"must be one of {', '.join(PRECISIONS)}, got {cfg.mixed_precision!r}")
    for key in ("warmup_steps", "save_every", "noise_offset"):
        if getattr(cfg, key) < 0:
            bad(key, f"must not be negative, got {getattr(cfg, key)}")
    if cfg.keep_checkpoints < 1:
        bad("keep_checkpoints", f"must be at least 1, got {cfg.keep_checkpoints}")
    if cfg.min_snr_gamma is not None and cfg.min_snr_gamma <= 0:
        bad("min_snr_gamma", f"must be positive (5 is usual), got {cfg.min_snr_gamma}")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm < 0:
        bad("max_grad_norm", f"must not be negative (0 turns clipping off), got {cfg.max_grad_norm}")
    if cfg.network_weights and not Path(cfg.network_weights).is_file():
        bad("network_weights", f"file {cfg.network_weights} does not exist: pass an existing LoRA .safetensors")
    for spec in cfg.base_lora:
        path, _ = parse_lora_spec(spec)
        if not Path(path).expanduser().exists():
            bad("base_lora", f"file {path} does not exist: pass FILE.safetensors[:WEIGHT]")


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
        if key not in KEYS or key == "preset":
            raise UserError(f"unknown key {raw_key!r} in {where}: valid keys are {', '.join(KEYS)}")
        out[key] = _coerce(key, value, f"in {where}")
    return out


def resolve_config(preset: str | None = None, overrides: dict | None = None, needs_data: bool = True) -> TrainConfig:
    """Defaults, then the preset, then the command line (values that are not None)."""
    values = {}
    if preset:
        table, where = read_preset(preset)
        values.update(check_keys(table, where))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, "on the command line")
    cfg = TrainConfig(**values)
    _validate(cfg, needs_data=needs_data)
    return cfg


def config_from_dict(values: dict) -> TrainConfig:
    """A config written by an earlier run (run.json, a checkpoint)."""
    return TrainConfig(**check_keys(values, "saved config"))
