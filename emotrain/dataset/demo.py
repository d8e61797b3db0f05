"""The generated demo set (--data demo): small captioned shapes, drawn from a seed."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from ..disk.atomic import atomic_path
from ..disk.cache import cache_root

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
