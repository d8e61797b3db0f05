"""The datasets of a run, from its options: --dataset-config's TOML with the flags filling
what it leaves out, or the one-folder shorthand (--data, --reg-data and the flags)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .kohya_config import read_dataset_config
from .spec import SUBSET_FIELDS, DatasetSpec, Subset, folder_subsets


def option_defaults(cfg) -> dict:
    """The command line's values under sd-scripts' key names: what a dataset TOML falls
    back to for every key it leaves out (as sd-scripts falls back to its arguments)."""
    return {
        "resolution": (cfg.resolution, cfg.resolution), "batch_size": cfg.batch_size,
        "enable_bucket": cfg.bucket, "caption_extension": cfg.caption_extension,
        "caption_prefix": cfg.caption_prefix, "caption_suffix": cfg.caption_suffix,
        "shuffle_caption": cfg.shuffle_captions, "keep_tokens": cfg.keep_tokens,
        "keep_tokens_separator": cfg.keep_tokens_separator, "caption_dropout_rate": cfg.caption_dropout,
        "caption_tag_dropout_rate": cfg.tag_dropout, "flip_aug": cfg.flip, "random_crop": cfg.random_crop,
        "alpha_mask": cfg.alpha_mask,
    }


def subset_template(cfg) -> Subset:
    """The subset the flags describe, for a folder still to be named."""
    values = {k: v for k, v in option_defaults(cfg).items() if k in SUBSET_FIELDS and v is not None}
    return Subset(image_dir=Path("."), **values)


def folder_spec(folder: Path, cfg, is_reg: bool = False) -> DatasetSpec:
    """One folder as a dataset with the command line's settings: --data's conventions for
    any folder (a validation set, say)."""
    return DatasetSpec(tuple(folder_subsets(Path(folder).expanduser(), subset_template(cfg), is_reg)),
                       (cfg.resolution, cfg.resolution), cfg.batch_size, cfg.bucket)


def specs_from_options(cfg, data_folder: Path | None = None) -> list[DatasetSpec]:
    """The datasets of a run: the TOML of --dataset-config, else --data (``data_folder``
    when it was resolved already, as the demo set is) plus --reg-data as one dataset."""
    if cfg.dataset_config:
        return read_dataset_config(cfg.dataset_config, option_defaults(cfg))
    spec = folder_spec(data_folder or Path(cfg.data), cfg)
    if cfg.reg_data:
        reg = folder_subsets(Path(cfg.reg_data).expanduser(), subset_template(cfg), is_reg=True)
        spec = dataclasses.replace(spec, subsets=spec.subsets + tuple(reg))
    return [spec]


@dataclass(frozen=True)
class Needs:
    """What the loop must keep loaded because the data changes per draw."""
    text_encoders: bool  # captions change per draw: encoded every step
    vae: bool  # random crops: encoded every step

    @classmethod
    def of(cls, cfg) -> "Needs":
        if cfg.dataset_config:
            subsets = [s for spec in specs_from_options(cfg) for s in spec.subsets]
        else:  # every folder of --data/--reg-data takes the flags' settings
            subsets = [subset_template(cfg)]
        return cls(any(s.per_draw_captions for s in subsets), any(s.random_crop for s in subsets))
