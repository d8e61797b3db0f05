"""The data cache and per-step text encoding, on the built-in tiny model (CPU).

1. Time to the first training step, first start vs second start of the same run: N
   synthetic captioned images, ``--steps 1``, a fresh cache folder. Each start is its own
   process; "to first step" is ``train()`` alone (imports excluded: the cache cannot speed
   them up), "process" is the whole command including imports and writing the LoRA.
2. Steady-state speed with per-draw captions (``--shuffle-captions``: both text
   encoders run every step) vs cached text embeddings: run.json's steps per second.

    OMP_NUM_THREADS=1 python benchmarks/data_cache.py [--images 200] [--size 768] [--resolution 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

TIMED_START = """
import sys, time
from emotrain.config import resolve_config
from emotrain.run.loop import train
cfg = resolve_config(None, {{"model": "tiny", "data": {data!r}, "resolution": {resolution}, "steps": 1,
                            "rank": 4, "cache_dir": {cache!r}, "output": {out!r}}})
started = time.perf_counter()
train(cfg)
print("SECONDS", time.perf_counter() - started)
"""


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    words = ["red", "blue", "round", "square", "shiny", "matte", "small", "large", "striped", "dotted"]
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        a, b, c = rng.random(3)
        pixels = np.stack([np.sin(6 * (xx * a + yy * b)), np.cos(5 * (xx * c - yy * a)), xx * yy * b], -1)
        Image.fromarray(((pixels + 1) * 127).clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
        tags = ", ".join(rng.choice(words, 5, replace=False))
        (folder / f"{i:04d}.txt").write_text(f"sks, {tags}\n")


def timed_start(data: Path, cache: Path, out: Path, resolution: int) -> dict:
    code = TIMED_START.format(data=str(data), cache=str(cache), out=str(out), resolution=resolution)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    wall = time.perf_counter() - started
    if proc.returncode:
        sys.exit(proc.stdout + proc.stderr)
    seconds = float(next(line for line in proc.stdout.splitlines() if line.startswith("SECONDS")).split()[1])
    cache_counts = json.loads((out / "run.json").read_text())["data"]["cache"]
    return {"to_first_step_s": seconds, "process_s": wall, "encoded": cache_counts["latents_encoded"],
            "loaded": cache_counts["latents_loaded"]}


def steady(data: Path, cache: Path, out: Path, steps: int, flags: list[str]) -> float:
    cmd = [sys.executable, "-m", "emotrain", "sdxl-lora", "--model", "tiny", "--data", str(data), "--resolution", "64",
           "--batch-size", "4", "--rank", "4", "--steps", str(steps), "--cache-dir", str(cache), "--output", str(out),
           *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stdout + proc.stderr)
    return json.loads((out / "run.json").read_text())["steps_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("EMOTRAIN_CACHE", str(tmp / "emotrain-cache"))
        data, cache = tmp / "data", tmp / "cache"
        make_images(data, args.images, args.size)
        first = timed_start(data, cache, tmp / "first", args.resolution)
        second = timed_start(data, cache, tmp / "second", args.resolution)
        print(f"{args.images} images {args.size}px at --resolution {args.resolution}, tiny model, --steps 1")
        for name, r in (("first start", first), ("second start", second)):
            print(f"  {name}: to first step {r['to_first_step_s']:.2f} s, whole process {r['process_s']:.2f} s "
                  f"(latents encoded {r['encoded']}, loaded {r['loaded']})")
        print(f"  second start faster by {first['to_first_step_s'] / second['to_first_step_s']:.1f}x to the first step, "
              f"{first['process_s'] / second['process_s']:.1f}x for the whole process")
        cached = steady(data, cache, tmp / "cached", args.steps, [])
        shuffled = steady(data, cache, tmp / "shuffled", args.steps, ["--shuffle-captions"])
        print(f"steady state, 64 px, batch 4, {args.steps} steps: cached text {cached:.2f} it/s, "
              f"--shuffle-captions (text encoded every step) {shuffled:.2f} it/s ({shuffled / cached:.2f}x)")


if __name__ == "__main__":
    main()
