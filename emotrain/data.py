"""Training images and captions: a kohya-style folder, or the generated demo set."""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

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
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
            examples.extend([Example(image, caption)] * repeats)
    if not examples:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root} or its N_name sub-folders: "
                        "add images with same-named .txt captions")
    return examples


def load_image(path: Path, resolution: int):
    """-> (tensor in [-1, 1], original (h, w), crop top-left (y, x)) after resizing the
    short side to ``resolution`` and a centre crop, the conditioning SDXL was trained with."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image {path} ({exc}): remove or replace the file") from None
    original = (img.height, img.width)
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), original, (top, left)


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
    from .sdxl.tiny import cache_root

    folder = cache_root() / f"demo-data-v{DEMO_VERSION}-{count}x{size}-seed{seed}"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        rng = random.Random(seed)
        for i in range(count):
            img, caption = _draw_demo(rng, size)
            img.save(tmp / f"{i:03d}.png")
            (tmp / f"{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:
            pass  # built concurrently by another process: identical content
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_data(data: str) -> Path:
    return demo_folder() if data == "demo" else Path(data).expanduser()
