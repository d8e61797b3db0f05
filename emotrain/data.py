"""Training images and captions, as the rest of emotrain has always asked for them; the
machinery lives in emotrain/dataset/."""

from __future__ import annotations

from pathlib import Path

from .dataset.buckets import bucket_sizes, choose_bucket, place
from .dataset.demo import demo_folder, resolve_data
from .dataset.images import IMAGE_SUFFIXES, load_pixels
from .dataset.scan import Example, scan_folder
from .dataset.spec import REPEAT_FOLDER

__all__ = ["IMAGE_SUFFIXES", "REPEAT_FOLDER", "Example", "bucket_sizes", "choose_bucket", "demo_folder",
           "load_image", "resolve_data", "scan_folder"]


def load_image(path: Path, resolution: int, bucket: bool = True):
    """-> (tensor in [-1, 1], original (h, w), crop top-left (y, x), target (h, w)): the
    image scaled to cover its bucket (or the square) and centre-cropped to it, with the
    numbers SDXL's size and crop conditioning is trained on."""
    from .dataset.images import inspect_image
    width, height, _ = inspect_image(Path(path))
    placement = place(width, height, *choose_bucket(width, height, resolution, bucket))
    pixels, _ = load_pixels(Path(path), placement)
    return pixels, placement.original, placement.crop, placement.target
