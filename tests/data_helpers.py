"""Small image sets written for data tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image


def write_images(folder: Path, captions: dict[str, str | None], size=(64, 64), extension: str = ".txt") -> Path:
    """``{"a.png": "tags, here", "b.png": None}``: images of distinct colours, with a
    caption file unless the caption is None."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, caption) in enumerate(captions.items()):
        Image.new("RGB", size, (37 * i % 256, 90 + 20 * i % 160, 200 - 15 * i % 200)).save(folder / name)
        if caption is not None:
            (folder / name).with_suffix(extension).write_text(caption + "\n", encoding="utf-8")
    return folder


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    """The real command line in a fresh process."""
    return subprocess.run([sys.executable, "-m", "emotrain", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "COLUMNS": "250"}, **kwargs)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    out = (proc.stdout + proc.stderr).strip()
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


def load_image(path: Path, resolution: int, bucket: bool = True):
    """-> (pixels in [-1, 1], original (h, w), crop top-left (y, x), target (h, w)): one image
    read as the loop reads it, with the numbers SDXL's size and crop conditioning sees."""
    from emotrain.dataset.buckets import choose_bucket, place
    from emotrain.dataset.images import inspect_image, load_pixels
    width, height, *_ = inspect_image(Path(path))
    placement = place(width, height, *choose_bucket(width, height, resolution, bucket))
    pixels, _ = load_pixels(Path(path), placement)
    return pixels, placement.original, placement.crop, placement.target
