"""sd-scripts' dataset config (``--dataset_config``), read unchanged.

``[general]`` holds defaults for every dataset and subset, each ``[[datasets]]`` its own
resolution, batch size and buckets plus defaults for its subsets, and each
``[[datasets.subsets]]`` one folder. A key left out falls back subset -> dataset ->
general -> the command line, as in sd-scripts. Keys emotrain cannot honour are refused
by name; sd-scripts keys whose value changes nothing (``color_aug = false``) pass.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path

from ..errors import UserError
from .spec import DATASET_FIELDS, SUBSET_FIELDS, DatasetSpec, Subset

# Where a key may stand, as sd-scripts' schema allows it.
SUBSET_ONLY = {"image_dir", "is_reg", "alpha_mask"}
DATASET_LEVEL = set(DATASET_FIELDS)  # [general] and [[datasets]]
ANY_LEVEL = set(SUBSET_FIELDS) - SUBSET_ONLY - {"image_dir"}

# sd-scripts keys honoured only at the value that changes nothing, and why.
NO_OP = {
    "color_aug": (False, "colour augmentation is not offered"),
    "enable_wildcard": (False, "caption wildcards are not supported"),
    "caption_dropout_every_n_epochs": (0, "use caption_dropout_rate"),
    "token_warmup_step": (0, "token warm-up is not supported"),
    "token_warmup_min": (1, "token warm-up is not supported"),
    "bucket_no_upscale": (False, "small images are left out per --max-upscale instead"),
    "network_multiplier": (1.0, "one network multiplier per run"),
    "validation_split": (0.0, "validation sets are not read from the dataset config"),
    "face_crop_aug_range": (None, "face crops are not supported"),
    "resize_interpolation": (None, "images are resized bicubic"),
    "custom_attributes": (None, "custom attributes are not supported"),
}
IGNORED = {"cache_info", "validation_seed"}  # they change nothing emotrain does
ELSEWHERE = {
    "metadata_file": "fine-tuning datasets (metadata_file) are not supported: use image_dir with caption files",
    "conditioning_data_dir": "ControlNet datasets are not supported",
    "prior_loss_weight": "pass --prior-loss-weight on the command line",
    "max_token_length": "pass --max-token-length on the command line",
}


def toml_value(value, limit: int = 80) -> str:
    """A value as TOML spells it (``true``, ``"text"``, ``inf``, ``{ a = 1 }``), as the
    user wrote it, for error messages; cut to ``limit`` characters."""
    def spell(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)  # JSON's escapes are TOML's basic-string escapes
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, list):
            return "[" + ", ".join(spell(x) for x in v) + "]"
        if isinstance(v, dict):
            keys = (k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False) for k in v)
            return "{ " + ", ".join(f"{k} = {spell(x)}" for k, x in zip(keys, v.values())) + " }" if v else "{}"
        return v.isoformat() if hasattr(v, "isoformat") else str(v)  # ints, floats, dates and times

    text = spell(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _where(ds: int | None = None, sub: int | None = None) -> str:
    if ds is None:
        return "[general]"
    return f"[[datasets]] #{ds + 1}" + ("" if sub is None else f" [[datasets.subsets]] #{sub + 1}")


class _Reader:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, problem: str):
        raise UserError(f"dataset config {self.path}: {where}: {problem}")

    def value(self, key: str, value, where: str):
        """One key's value, checked for its type and range."""
        def need(ok: bool, kind: str):
            if not ok:
                self.fail(where, f"{key} must be {kind}, got {toml_value(value)}")
            return value

        is_int = isinstance(value, int) and not isinstance(value, bool)
        is_num = (is_int or isinstance(value, float)) and math.isfinite(value)
        if key == "resolution":
            pair = [value, value] if is_int else value
            need(isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                   and v >= 64 and v % 32 == 0 for v in pair),
                 "a multiple of 32 of at least 64, or [width, height] of such")
            return tuple(pair)
        if key in ("num_repeats", "batch_size"):
            return need(is_int and value >= 1, "an integer of at least 1")
        if key == "keep_tokens":
            return need(is_int and value >= 0, "an integer of at least 0")
        if key in ("min_bucket_reso", "max_bucket_reso"):
            return need(is_int and value >= 32, "an integer of at least 32")
        if key == "bucket_reso_steps":
            return need(is_int and value >= 32 and value % 32 == 0, "a multiple of 32 (the VAE and UNet scale)")
        if key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            return need(is_num and 0 <= value <= 1, "a number from 0 to 1")
        if key in ("is_reg", "alpha_mask", "shuffle_caption", "flip_aug", "random_crop", "enable_bucket"):
            return need(isinstance(value, bool), "true or false")
        if key == "caption_separator":
            return need(isinstance(value, str) and value != "", "a non-empty string")
        if key == "caption_extension":
            return need(isinstance(value, str) and value.startswith(".") and len(value) > 1,
                        "a file suffix such as \".txt\"")
        return need(isinstance(value, str), "a string")

    def table(self, table, where: str, allowed: set[str], skip: tuple = ()) -> dict:
        if not isinstance(table, dict):
            self.fail(where, "must be a table")
        out = {}
        for key, value in table.items():
            if key in skip or key in IGNORED:
                continue
            if key in ELSEWHERE:
                self.fail(where, f"{key}: {ELSEWHERE[key]}")
            if key in NO_OP:
                noop, why = NO_OP[key]
                if not (value == noop or (noop is None and value in ([], {}, ""))):
                    self.fail(where, f"{key} = {toml_value(value)} cannot be honoured ({why}): remove the key")
                continue
            if key not in allowed:
                known = SUBSET_FIELDS + DATASET_FIELDS
                if key in known:
                    self.fail(where, f"{key} does not belong here (sd-scripts reads it in "
                                     f"{'[[datasets.subsets]]' if key in SUBSET_ONLY else '[general] or [[datasets]]'})")
                self.fail(where, f"unknown key {key!r}: the keys emotrain reads are {', '.join(sorted(known))}")
            out[key] = self.value(key, value, where)
        return out


def read_dataset_config(path, fallback: dict) -> list[DatasetSpec]:
    """The datasets a TOML file describes; ``fallback``: the command line's values by
    sd-scripts' key names."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"dataset config {path} is a folder: pass the .toml file (sd-scripts' dataset config), "
                        "or the folder of images as --data")
    if not path.is_file():
        raise UserError(f"dataset config {path} does not exist: pass an existing .toml file")
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise UserError(f"dataset config {path} cannot be read ({exc.strerror or exc}): check its permissions") from None
    except UnicodeDecodeError:
        raise UserError(f"dataset config {path} is not UTF-8 text: save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"dataset config {path} is not valid TOML ({exc}): fix the file") from None
    reader = _Reader(path)
    extra = sorted(set(raw) - {"general", "datasets"})
    if extra:
        reader.fail("top level", f"unknown table {extra[0]!r}: sd-scripts' dataset config has [general] and "
                                 "[[datasets]] with [[datasets.subsets]]")
    general = reader.table(raw.get("general", {}), "[general]", ANY_LEVEL | DATASET_LEVEL)
    datasets = raw.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        reader.fail("top level", "no [[datasets]]: add at least one [[datasets]] with a [[datasets.subsets]]")
    specs = []
    for d, table in enumerate(datasets):
        values = reader.table(table, _where(d), ANY_LEVEL | DATASET_LEVEL, skip=("subsets",))
        subsets = table.get("subsets")
        if not isinstance(subsets, list) or not subsets:
            reader.fail(_where(d), "no [[datasets.subsets]]: add one with image_dir = \"FOLDER\"")
        layered = {**fallback, **general, **values}
        built = tuple(_subset(reader, path, reader.table(s, _where(d, i), ANY_LEVEL | SUBSET_ONLY), layered,
                              _where(d, i)) for i, s in enumerate(subsets))
        specs.append(_dataset(reader, built, layered, _where(d)))
    return specs


def _subset(reader: _Reader, config: Path, values: dict, layered: dict, where: str) -> Subset:
    if "image_dir" not in values:
        reader.fail(where, "image_dir is missing: every subset names its folder")
    folder = Path(values["image_dir"]).expanduser()
    if not folder.is_absolute() and not folder.is_dir() and (config.parent / folder).is_dir():
        folder = config.parent / folder  # sd-scripts reads it from the working folder; also try beside the file
    if not folder.is_dir():
        reader.fail(where, f"image_dir {values['image_dir']} is not a folder: fix the path")
    merged = {k: v for k, v in {**layered, **values}.items() if k in SUBSET_FIELDS and v is not None}
    merged["image_dir"] = folder.resolve()
    return Subset(**merged)


def _dataset(reader: _Reader, subsets: tuple, layered: dict, where: str) -> DatasetSpec:
    values = {k: layered.get(k) for k in DATASET_FIELDS if layered.get(k) is not None}
    spec = DatasetSpec(subsets, **values)
    steps = spec.bucket_reso_steps or 64
    low, high = spec.min_bucket_reso, spec.max_bucket_reso
    if low is not None and low > min(spec.resolution):
        reader.fail(where, f"min_bucket_reso {low} is above the resolution {spec.resolution}: lower it")
    if high is not None and high < max(spec.resolution):
        reader.fail(where, f"max_bucket_reso {high} is below the resolution {spec.resolution}: raise it")
    if low is not None and high is not None and low > high:
        reader.fail(where, "min_bucket_reso is above max_bucket_reso: swap them")
    if spec.bucket_reso_steps is not None and any(r % steps for r in spec.resolution):
        reader.fail(where, f"resolution {spec.resolution} is not a multiple of bucket_reso_steps {steps}")
    if all(s.is_reg for s in subsets):
        reader.fail(where, "holds only is_reg subsets: regularization images go with training images "
                           "in the same [[datasets]]")
    return spec
