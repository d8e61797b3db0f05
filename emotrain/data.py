"""Training images and captions: a kohya-style folder, or the generated demo set."""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from .atomic import atomic_path
from .cache import cache_root
from .errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def scan_folder(folder: str | Path) -> list[Example]:
    """Images with same-named .txt captions. Sub-folders named ``N_name`` repeat their
    images N times, as in sd-scripts; images directly in the folder count once."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist: pass an existing folder, or --data demo")
    sources = [(root, 1)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        match = REPEAT_FOLDER.match(sub.name)
        if match:
            sources.append((sub, int(match.group(1))))
    examples = []
    for source, repeats in sources:
        for image in sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption_file = image.with_suffix(".txt")
            try:
                caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
            except UnicodeDecodeError as exc:
                raise UserError(f"caption {caption_file} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
            examples.extend([Example(image, caption)] * repeats)
    if not examples:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root} or its N_name sub-folders: "
                        "add images with same-named .txt captions")
    return examples


@functools.lru_cache(maxsize=None)
def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """Aspect-ratio buckets as sd-scripts makes them: (width, height) in steps of 64 px
    (32 below 512 px), sides from half to twice ``resolution``, area at most resolution^2."""
    step = 64 if resolution >= 512 else 32
    low, high = max(step, resolution // 2 // step * step), resolution * 2
    sizes = set()
    for width in range(low, high + 1, step):
        height = min(high, resolution * resolution // width // step * step)
        if height >= low:
            sizes.add((width, height))
            sizes.add((height, width))
    return sorted(sizes)


def choose_bucket(width: int, height: int, resolution: int, bucket: bool) -> tuple[int, int]:
    if not bucket:
        return resolution, resolution
    ratio = width / height
    return min(bucket_sizes(resolution), key=lambda wh: (abs(math.log(wh[0] / wh[1] / ratio)), -wh[0] * wh[1]))


def load_image(path: Path, resolution: int, bucket: bool = True):
    """-> (tensor in [-1, 1], original (h, w), crop top-left (y, x), target (h, w)): the
    image scaled to cover its bucket (or the square) and centre-cropped to it, with the
    numbers SDXL's size and crop conditioning is trained on."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {path} ({exc}): remove or replace the file") from None
    original = (img.height, img.width)
    target_w, target_h = choose_bucket(img.width, img.height, resolution, bucket)
    scale = max(target_w / img.width, target_h / img.height)
    size = (max(target_w, round(img.width * scale)), max(target_h, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - target_w) // 2, (size[1] - target_h) // 2
    img = img.crop((left, top, left + target_w, top + target_h))
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), original, (top, left), (target_h, target_w)


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
DEMO_VERSION = 1


def _draw_demo(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    fg, bg = rng.sample(list(COLOURS), 2)
    shape = rng.choice(SHAPES)
    img = Image.new("RGB", (size, size), COLOURS[bg])
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[fg])
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[fg])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[fg])
    return img, f"a {fg} {shape} on a {bg} background"


def demo_folder(count: int = 16, size: int = 128, seed: int = 0) -> Path:
    """A small captioned image set, drawn deterministically and cached; built in a
    temporary folder and renamed, so a half-written set is never used."""
    folder = cache_root() / f"demo-data-v{DEMO_VERSION}-{count}x{size}-seed{seed}"
    if folder.is_dir():
        return folder
    with atomic_path(folder, directory=True, if_exists="keep") as tmp:  # racing builds are identical
        rng = random.Random(seed)
        for i in range(count):
            img, caption = _draw_demo(rng, size)
            img.save(tmp / f"{i:03d}.png")
            (tmp / f"{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def resolve_data(data: str) -> Path:
    return demo_folder() if data == "demo" else Path(data).expanduser()
