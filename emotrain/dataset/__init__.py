"""Training data as users keep it: kohya-style folders and sd-scripts' dataset TOML,
captions with their per-draw changes, augmentation, masks, regularization images, and
the on-disk cache of encoded latents and text embeddings.

Pure Python here (the command line checks the data options before torch is imported):
- spec.py: the model (datasets of subsets), built from the TOML (kohya_config.py) or
  the flags (from_options.py, with ``Needs``: the encoders the loop keeps for per-draw
  data).
- captions.py, buckets.py, problems.py: caption rules, bucket arithmetic, data warnings.
Reading and encoding (PIL, torch), imported by module where used:
- scan.py: folders -> examples and the draws of an epoch (``scan_folder`` reads one
  folder with --data's conventions, for any set of images), the data summary;
- images.py: reading images (orientation, 16-bit, transparency, masks);
- latent_cache.py, encode.py: the cache and the encoding before training;
- loader.py: the batches the loop draws.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .cache_folder import cache_folder, check_folder
from .from_options import Needs, folder_spec, option_defaults, specs_from_options
from .spec import DatasetSpec, Subset

__all__ = ["DatasetSpec", "cache_folder", "Needs", "Subset", "check_options", "folder_spec", "option_defaults", "specs_from_options"]


def check_options(cfg, needs_data: bool = True) -> None:
    """The data options on their own and together: one line for the first problem."""
    if cfg.data and cfg.dataset_config:
        raise UserError("data: --data and --dataset-config both given: pass one (the TOML names its folders)")
    if cfg.reg_data and cfg.dataset_config:
        raise UserError("reg_data: --reg-data with --dataset-config: add a [[datasets.subsets]] with is_reg = true "
                        "to the TOML instead")
    if not cfg.caption_extension.startswith(".") or len(cfg.caption_extension) < 2:
        raise UserError(f"caption_extension: must be a file suffix such as .txt, got {cfg.caption_extension!r}")
    if cfg.keep_tokens_separator == "":
        raise UserError("keep_tokens_separator: must not be empty: pass a separator such as '|||' or leave it out")
    if cfg.disk_cache:
        check_folder(cache_folder(cfg))
    if cfg.reg_data and not Path(cfg.reg_data).expanduser().is_dir():
        raise UserError(f"reg_data: folder {cfg.reg_data} does not exist: pass an existing folder of "
                        "regularization images")
    if cfg.dataset_config:
        specs_from_options(cfg)  # reads and checks the whole TOML
    elif needs_data:
        if not cfg.data:
            raise UserError("data: no training data given: pass --data DIR (images with .txt captions), "
                            "--dataset-config FILE.toml, or --data demo")
        if cfg.data != "demo" and not Path(cfg.data).expanduser().is_dir():
            raise UserError(f"data: folder {cfg.data} does not exist: pass an existing folder of images, "
                            "or --data demo")
