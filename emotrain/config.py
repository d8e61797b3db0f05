"""The training configuration: ``TrainConfig`` built from the option declarations
(options.py), filled from defaults, a preset (TOML) and the command line, and checked
before any model is loaded. Pure Python: no torch here."""

from __future__ import annotations

import dataclasses
import tomllib
from importlib import resources
from pathlib import Path

from .disk.atomic import check_writable
from .dataset import check_options as check_data_options
from .dataset.kohya_config import toml_value
from .errors import UserError
from .lora.formats import resolve_lora_file
from .optimizers import DEFAULT_LR, group_lr_problem, parse_optim_args, schedule_problem
from .options import BY_NAME, OPTIONS, RESUMABLE, Option, parse_lora_spec
from .sources import check_model, tiny_seed
from .watch.checks import check_watch_options


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

    @property
    def part_lrs(self) -> dict[str, float]:
        """The learning rate of each part: --lr where none is named; one --text-encoder-lr
        value is both encoders', two are TE1's then TE2's."""
        te = [float(x) for x in self.text_encoder_lr] or [self.lr]
        return {"unet": self.lr if self.unet_lr is None else self.unet_lr, "text_encoder": te[0],
                "text_encoder_2": te[-1]}

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
        if o.items and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if o.items and isinstance(value, list):  # numbers from a TOML preset
            value = [repr(float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{o.name} {where} must be a list of strings, got {toml_value(value)}")
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
    raise UserError(f"{o.name} {where} must be {kind}, got {toml_value(value)}")


def validate(cfg: TrainConfig, needs_data: bool = True) -> None:
    """Every value against its declaration, then what only the whole config can say."""
    def bad(key, problem):
        raise UserError(f"{key}: {problem}")

    for o in OPTIONS:
        value = getattr(cfg, o.name)
        empty = o.type is str and value is not None and not value.strip()
        problem = ("is empty: give a value, or leave the option out" if empty else None) or o.problem(value) \
            or _not_utf8(value)
        if problem:
            bad(o.name, f"{problem} {o.hint}".rstrip())
    if not cfg.model:
        bad("model", "no model given: pass --model PATH|REPO_ID|tiny or a preset that sets it")
    if needs_data or cfg.model != "sdxl":  # `vram` plans "sdxl" from its shipped configs
        check_model(cfg.model)
    if needs_data and cfg.data and cfg.data != "demo" and Path(cfg.data).expanduser().is_file():
        bad("data", f"{cfg.data} is a file: pass the folder that holds the images, or --data demo")
    check_data_options(cfg, needs_data)
    if needs_data:
        check_output_folder(cfg.output)
    if cfg.lokr_factor == 0:
        bad("lokr_factor", "0 splits nothing: use -1 (LyCORIS' default) or a positive factor such as 8")
    for key, value in (("lokr_factor", cfg.lokr_factor != -1), ("lokr_full_matrix", cfg.lokr_full_matrix)):
        if value and cfg.adapter != "lokr":
            bad(key, f"applies to --adapter lokr only, not {cfg.adapter}: drop it or pass --adapter lokr")
    if cfg.fp8_base and cfg.mixed_precision != "bf16":
        bad("fp8_base", f"computes each layer in bf16, not --mixed-precision {cfg.mixed_precision}: add "
            "--mixed-precision bf16 or drop --fp8-base")
    if cfg.fp8_base and cfg.adapter == "dora":
        bad("fp8_base", "--adapter dora forms each layer's whole weight from the base weight, which --fp8-base keeps "
            "in float8: drop --fp8-base or use --adapter lora, loha or lokr")
    if cfg.compile:  # combinations not tried compiled: refused rather than trusted
        for key in ("fp8_base", "network_dropout", "rank_dropout", "module_dropout"):
            if getattr(cfg, key):
                bad(key, f"is not supported with --compile yet: drop --compile or --{key.replace('_', '-')}")
        if cfg.adapter != "lora":
            bad("compile", f"is tried with --adapter lora only, not {cfg.adapter}: drop --compile or use --adapter lora")
    for key in ("network_dropout", "rank_dropout", "module_dropout", "scale_weight_norms"):
        if getattr(cfg, key) and cfg.adapter != "lora":  # defined on up/down factors (sd-scripts' LoRA)
            bad(key, f"applies to --adapter lora only, not {cfg.adapter}: drop it or pass --adapter lora")
    if cfg.targets == "transformer" and cfg.conv_rank:
        bad("conv_rank", "--targets transformer has no convolutions: drop --conv-rank or use --targets full")
    try:
        parse_optim_args(cfg.optim_args)  # key=value form and finite numbers; the optimizer checks the rest
    except UserError as exc:
        bad("optim_args", exc)
    if schedule_problem(cfg.optim, cfg.lr_scheduler):
        bad("lr_scheduler", schedule_problem(cfg.optim, cfg.lr_scheduler))
    if cfg.warmup_steps > cfg.steps:
        bad("warmup_steps", f"{cfg.warmup_steps} is more than --steps {cfg.steps}: the LR would never reach --lr; "
            "lower --warmup-steps")
    for key, specs in (("network_weights", [cfg.network_weights] if cfg.network_weights else []),
                       ("base_lora", cfg.base_lora)):
        for spec in specs:
            try:
                resolve_lora_file(parse_lora_spec(spec)[0] if key == "base_lora" else spec)
            except UserError as exc:
                bad(key, exc)
    check_watch_options(cfg, bad)
    check_schedule_options(cfg, bad)
    check_ema_options(cfg, bad)


def check_ema_options(cfg, bad) -> None:
    """The EMA's companions need an EMA; a schedule-free optimizer already averages."""
    for key in ("ema_on_cpu", "ema_for_eval"):
        if getattr(cfg, key) and not cfg.ema_decay:
            bad(key, f"needs an EMA, and --ema-decay is 0 (off): add --ema-decay (e.g. 0.999) or drop "
                f"{BY_NAME[key].cli_name}")
    if cfg.ema_decay and cfg.optim == "adamw-schedulefree":
        bad("ema_decay", "adamw-schedulefree already averages its weights (its saved LoRA is that average): drop "
            "--ema-decay or pick another --optim")


def check_schedule_options(cfg, bad) -> None:
    """What the flags alone say about v-prediction and zero terminal SNR (what the model
    says is checked once it is found, still before its weights load)."""
    from .watch.checks import check_samplers_for

    if cfg.zero_terminal_snr and cfg.v_parameterization is False:
        bad("zero_terminal_snr", "a zero-terminal-SNR schedule needs v-prediction, and --no-v-parameterization "
            "was given: drop one of them")
    if cfg.scale_v_pred_loss_like_noise_pred and cfg.v_parameterization is False:
        bad("scale_v_pred_loss_like_noise_pred", "scales a v-prediction loss, and --no-v-parameterization was "
            "given: drop one of them")
    parts = cfg.part_lrs if cfg.train_text_encoders else {"unet": cfg.part_lrs["unet"]}
    lrs = [*parts.values(), *([lr * cfg.loraplus_ratio for lr in parts.values()] if cfg.loraplus_ratio else [])]
    problem = group_lr_problem(cfg.optim, lrs)  # found here, before the model loads
    if problem:
        bad("optim", problem)
    if cfg.text_encoder_lr and not cfg.train_text_encoders:
        bad("text_encoder_lr", "the text encoders are not trained: add --train-text-encoders or drop "
            "--text-encoder-lr")
    if cfg.max_timestep is not None and cfg.min_timestep >= cfg.max_timestep:
        bad("min_timestep", f"{cfg.min_timestep} is not below --max-timestep {cfg.max_timestep}: timesteps are drawn "
            "from [min, max): lower --min-timestep or raise --max-timestep")
    if cfg.noise_offset_random_strength and not cfg.noise_offset:
        bad("noise_offset_random_strength", "draws the strength of the noise offset, which is 0: add --noise-offset "
            "(e.g. 0.05) or drop the flag")
    try:
        check_samplers_for(cfg, bool(cfg.zero_terminal_snr))
    except UserError as exc:
        raise UserError(str(exc)) from None


def _not_utf8(value) -> str | None:
    """Paths and text go into JSON and file headers as UTF-8: bytes that are not UTF-8
    (a shell's $'\\xff', a file name from another system) would fail at the end of a run."""
    for text in (value if isinstance(value, list) else [value]):
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return f"{text!r} holds bytes that are not UTF-8: rename it or pass another path"
    return None


def check_output_folder(output: str) -> None:
    """A run's output must be a folder (or nothing yet) that can be made."""
    if not str(output).strip():
        raise UserError("output: empty: pass --output DIR")
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"output: {output} is a file: pass a folder for the run (it is created if missing)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"output: cannot create {output}: {parent} is a file")
            break
    try:
        check_writable(path / "run.json")
    except UserError as exc:
        raise UserError(f"output: {exc}") from None


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("emotrain.presets").iterdir() if p.name.endswith(".toml"))


def read_preset(preset: str) -> tuple[dict, str]:
    """A preset by name (shipped with emotrain) or by path -> (raw table, where it came from)."""
    path = Path(preset).expanduser()
    if not preset.strip():
        raise UserError(f"--preset is empty: pass a .toml file or one of: {', '.join(preset_names())}")
    if path.suffix == ".toml" or path.exists():
        if path.is_dir():
            raise UserError(f"preset {preset} is a folder: pass a .toml file or one of: {', '.join(preset_names())}")
        if not path.is_file():
            raise UserError(f"preset file {preset} does not exist: pass an existing .toml or one of: {', '.join(preset_names())}")
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as exc:
            raise UserError(f"preset {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8 TOML") from None
        except OSError as exc:
            raise UserError(f"cannot read preset {path} ({exc.strerror}): check the file") from None
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
    if preset is not None:
        table, where = read_preset(preset)
        values.update(check_keys(table, where))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = coerce(BY_NAME[key], value, "on the command line")
    return values


def resolve_config(preset: str | None = None, overrides: dict | None = None, needs_data: bool = True,
                   defaults: dict | None = None) -> TrainConfig:
    """The declared defaults (or ``defaults``), then the preset, then the command line;
    an optimizer with a learning rate of its own (Prodigy: 1.0) has it unless one is given."""
    given = given_values(preset, overrides)
    optim = given.get("optim", (defaults or {}).get("optim", BY_NAME["optim"].default))
    if "lr" not in given and optim in DEFAULT_LR:
        given["lr"] = DEFAULT_LR[optim]
    cfg = TrainConfig(**{**(defaults or {}), **given})
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


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with its local paths made absolute, as a run records it: a resume from
    another working directory finds the same data, model and LoRAs."""
    def absolute(path: str) -> str:
        p = Path(path).expanduser()
        return str(p.resolve()) if p.exists() or path == cfg.output else path

    specs = []
    for spec in cfg.base_lora:
        path, weight = parse_lora_spec(spec)
        specs.append(absolute(path) + ("" if path == spec else f":{weight!r}"))
    return cfg.replace(data=cfg.data if cfg.data in (None, "demo") else absolute(cfg.data),
                       model=cfg.model if not cfg.model or tiny_seed(cfg.model) is not None else absolute(cfg.model), output=absolute(cfg.output),
                       network_weights=absolute(cfg.network_weights) if cfg.network_weights else None,
                       base_lora=specs)

