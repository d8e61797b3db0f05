"""What a training set is made of, in sd-scripts' terms: datasets (resolution, batch size,
buckets) of subsets (one folder each, with its repeats, caption and augmentation
settings). ``--dataset-config`` reads sd-scripts' TOML into this model
(kohya_config.py); ``--data``/``--reg-data`` and the caption flags are the one-folder
shorthand for the same model (from_options.py). Field names are the TOML keys.

Pure Python: the command line checks all of it before torch is imported.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Subset:
    image_dir: Path
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None  # the caption of an image without a caption file
    caption_extension: str = ".txt"
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_separator: str = ","
    secondary_separator: str | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False

    @property
    def per_draw_captions(self) -> bool:
        """The caption text changes from one draw of an image to the next."""
        return self.shuffle_caption or self.caption_dropout_rate > 0 or self.caption_tag_dropout_rate > 0

    @property
    def name(self) -> str:
        return self.image_dir.name or str(self.image_dir)


@dataclass(frozen=True)
class DatasetSpec:
    subsets: tuple[Subset, ...]
    resolution: tuple[int, int]  # (width, height): buckets hold at most width x height pixels
    batch_size: int = 1
    enable_bucket: bool = True
    min_bucket_reso: int | None = None  # None: half the resolution
    max_bucket_reso: int | None = None  # None: twice the resolution
    bucket_reso_steps: int | None = None  # None: 64 px (32 below 512)


SUBSET_FIELDS = tuple(f.name for f in dataclasses.fields(Subset))
DATASET_FIELDS = ("resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                  "bucket_reso_steps")


def repeat_folders(folder: Path) -> tuple[list[tuple[Path, int, str]], list[Path]]:
    """A kohya-style folder's ``N_name`` sub-folders -> ([(folder, N, name)], links): a
    sub-folder that links to the folder itself or to a folder already read (``5_x -> .``)
    would read the same images again and is left out, in the second list."""
    subs = sorted(p for p in folder.iterdir() if p.is_dir())
    seen = {folder.resolve()} | {p.resolve() for p in subs if not p.is_symlink()}
    kept, links = [], []
    for sub in subs:
        match = REPEAT_FOLDER.match(sub.name)
        if not match or int(match.group(1)) < 1:
            continue
        if sub.is_symlink():
            if sub.resolve() in seen:
                links.append(sub)
                continue
            seen.add(sub.resolve())
        kept.append((sub, int(match.group(1)), match.group(2)))
    return kept, links


def folder_subsets(folder: Path, template: Subset, is_reg: bool = False) -> list[Subset]:
    """A kohya-style folder: its own images once, and each ``N_name`` sub-folder's images N
    times with "name" as the caption of images that have none. Other sub-folders, and links
    to a folder already read, are not read (the scan reports them)."""
    subsets = [dataclasses.replace(template, image_dir=folder, num_repeats=1, is_reg=is_reg)]
    for sub, repeats, name in repeat_folders(folder)[0]:
        subsets.append(dataclasses.replace(template, image_dir=sub, num_repeats=repeats, class_tokens=name,
                                           is_reg=is_reg))
    return subsets
