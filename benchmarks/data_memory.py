"""Peak memory of encoding a large dataset: does the latent cache stream?

N synthetic captioned images are scanned and encoded by emotrain's own encoding step
(emotrain/dataset/encode.py) with the disk cache (latents written, none kept) and with
--no-disk-cache (all latents in memory), each mode in its own process. Reported: the
process's resident memory after every tenth of the images, its peak, and the CUDA peak.
On a GPU the VAE is real-size SDXL's (shipped config, random weights: memory and speed do
not depend on the values); on a CPU, the tiny model's.

    python benchmarks/data_memory.py [--images 2000] [--size 1024] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
from PIL import Image


def _image(args) -> None:
    folder, i, size = args
    rng = np.random.default_rng(i)
    a, b, c = rng.random(3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    pixels = np.stack([np.sin(6 * (xx * a + yy * b)), np.cos(5 * (xx * c - yy * a)), xx * yy * b], -1)
    Image.fromarray(((pixels + 1) * 127).clip(0, 255).astype(np.uint8)).save(f"{folder}/{i:05d}.jpg", quality=90)
    Path(f"{folder}/{i:05d}.txt").write_text(f"image {i}, synthetic\n")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def encode_all(data: Path, cache_dir: str | None, resolution: int) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from emotrain.dataset.encode import Counts, _encode_latents, _items
    from emotrain.dataset.latent_cache import Cache, module_identity
    from emotrain.dataset.scan import scan_datasets
    from emotrain.dataset.spec import DatasetSpec, Subset
    from emotrain.sdxl import load_config, load_sdxl

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        vae = AutoencoderKL.from_config(load_config("sdxl_vae")).to(device).eval().requires_grad_(False)
        model = "real-size SDXL VAE (random weights), fp32"
    else:
        vae = load_sdxl("tiny").vae
        model = "tiny model VAE, fp32"
    sdxl = types.SimpleNamespace(vae=vae)
    scanned = scan_datasets([DatasetSpec((Subset(image_dir=data),), (resolution, resolution))])
    items, _ = _items(scanned.entries)
    cache, counts = Cache(Path(cache_dir) if cache_dir else None), Counts()
    vae_id = module_identity(vae)
    start_rss, trace, started = rss_bytes(), [], time.perf_counter()
    for k, item in enumerate(items, 1):
        _encode_latents(sdxl, item, cache, vae_id, device, counts)
        if k % max(1, len(items) // 10) == 0:
            trace.append({"images": k, "rss_mib": round(rss_bytes() / 2**20), "seconds": round(time.perf_counter() - started, 1)})
    return {"mode": "disk cache" if cache_dir else "memory (--no-disk-cache)", "device": device, "model": model,
            "images": len(items), "encoded": counts.latents_encoded, "rss_before_mib": round(start_rss / 2**20),
            "trace": trace, "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None,
            "seconds": round(time.perf_counter() - started, 1),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # DATA CACHE_DIR|-
    args = parser.parse_args()
    if args.child:
        data, cache_dir = args.child
        print("RESULT " + json.dumps(encode_all(Path(data), None if cache_dir == "-" else cache_dir, args.resolution)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        started = time.perf_counter()
        with multiprocessing.Pool() as pool:
            pool.map(_image, [(str(data), i, args.size) for i in range(args.images)])
        print(f"wrote {args.images} images of {args.size} px in {time.perf_counter() - started:.0f} s", flush=True)
        results = []
        for cache_dir in (str(Path(tmp) / "cache"), "-"):
            proc = subprocess.run([sys.executable, __file__, "--resolution", str(args.resolution), "--child",
                                   str(data), cache_dir], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(proc.stdout + proc.stderr)
            results.append(json.loads(line[7:]))
            r = results[-1]
            print(f"{r['mode']}: {r['images']} images in {r['seconds']} s on {r['gpu'] or r['device']} ({r['model']}); "
                  f"RSS {r['rss_before_mib']} MiB before, after each tenth "
                  f"{[t['rss_mib'] for t in r['trace']]} MiB, peak {r['peak_rss_mib']} MiB; "
                  f"CUDA peak {r['cuda_peak_mib']} MiB", flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "data_memory.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
