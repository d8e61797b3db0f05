"""Aspect-ratio buckets and where an image lands in one: pure arithmetic on sizes."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass


@functools.lru_cache(maxsize=None)
def bucket_sizes(resolution, step: int | None = None, min_side: int | None = None,
                 max_side: int | None = None) -> list[tuple[int, int]]:
    """Aspect-ratio buckets as sd-scripts makes them: (width, height) in steps of ``step``
    px (default 64, 32 below 512), sides from ``min_side`` (default half the resolution) to
    ``max_side`` (default twice it), area at most the resolution's. ``resolution``: an int
    (a square) or (width, height)."""
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    area = width * height
    step = step or (64 if min(width, height) >= 512 else 32)
    low = (min_side // step * step) if min_side else max(step, min(width, height) // 2 // step * step)
    high = -(-max_side // step) * step if max_side else 2 * max(width, height)
    square = math.isqrt(area) // step * step
    sizes = {(square, square)} if low <= square <= high else set()
    for w in range(low, high + 1, step):
        h = min(high, area // w // step * step)
        if h >= low:
            sizes.add((w, h))
            sizes.add((h, w))
    return sorted(sizes)


def choose_bucket(width: int, height: int, resolution, bucket: bool = True, step: int | None = None,
                  min_side: int | None = None, max_side: int | None = None) -> tuple[int, int]:
    """The (width, height) an image of this size trains at: the bucket nearest its aspect
    ratio (the larger one on a tie), or the resolution itself without buckets."""
    if not bucket:
        return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    ratio = width / height
    return min(bucket_sizes(resolution, step, min_side, max_side),
               key=lambda wh: (abs(math.log(wh[0] / wh[1] / ratio)), -wh[0] * wh[1]))


@dataclass(frozen=True)
class Placement:
    """How an image becomes its bucket: scaled to cover it, then cropped. Sizes (h, w)."""
    original: tuple[int, int]
    scaled: tuple[int, int]
    target: tuple[int, int]
    crop: tuple[int, int]  # top-left (y, x) of the centre crop in the scaled image

    @property
    def upscale(self) -> float:
        return self.scaled[0] / self.original[0]

    def flipped_crop(self, crop: tuple[int, int] | None = None) -> tuple[int, int]:
        """The crop's top-left in the horizontally flipped image (what SDXL's crop
        conditioning sees for a flipped draw)."""
        y, x = crop or self.crop
        return y, self.scaled[1] - x - self.target[1]


def place(width: int, height: int, target_w: int, target_h: int) -> Placement:
    scale = max(target_w / width, target_h / height)
    scaled_w, scaled_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    crop = ((scaled_h - target_h) // 2, (scaled_w - target_w) // 2)
    return Placement((height, width), (scaled_h, scaled_w), (target_h, target_w), crop)
