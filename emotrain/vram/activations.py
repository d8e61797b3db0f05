"""The activations of a run's training step, traced (trace.py) once per shape set and kept
in a small JSON cache in the emotrain cache folder, so ``emotrain vram`` stays quick.

The step traced is the largest one the run makes: the largest bucket holds at most
``resolution``² pixels, and every bucket has fewer (sd-scripts' buckets, dataset/), so
the square ``resolution`` x ``resolution`` batch of ``batch_size`` sets the peak.

The margin beside the activations has two parts, neither fitted to a measurement:
- allocator rounding, from the trace: CUDA's caching allocator counts every tensor
  rounded up to 512 bytes, so the trace's peak is taken both ways and the difference
  is the margin's first part;
- ``CUDA_WORKSPACE_BYTES``, a fixed allowance for cuBLAS's workspaces, which torch
  allocates through the same allocator (so ``max_memory_allocated`` counts them): its
  default workspace is 32 MiB per cuBLAS handle on Hopper and newer cards
  (``CUBLAS_WORKSPACE_CONFIG=:4096:8``; older cards get less), and a step uses two
  handles, one on the thread that runs the forward and one on autograd's device thread
  that runs the backward. cuDNN's convolution workspaces are chosen at run time by its
  heuristics and are not in the plan.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

CUDA_WORKSPACE_BYTES = 2 * 32 * 2**20
CACHE_FILE = "vram-activations.json"
# What the traced step's shapes are made of: a change to any of these files re-traces.
_CODE = ("loss.py", "sdxl/conditioning.py", "lora/inject.py", "lora/kinds.py", "vram/trace.py", "vram/activations.py")


def largest_batch_latents(cfg) -> tuple[int, int]:
    """(height, width) of the latents of the largest bucket: resolution² pixels, square."""
    return cfg.resolution // 8, cfg.resolution // 8


def _versions() -> dict:
    import diffusers
    import peft
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__}


def _code_hash() -> str:
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in _CODE:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


def _lora_shape(unet) -> list:
    """Each adapted layer's name and ranks: what the adapter adds to the step's tensors."""
    from ..lora.kinds import LORA
    return sorted([name, [int(p.shape[0]) if p.ndim else 0 for p in sub.parameters() if p.requires_grad]]
                  for name, sub in unet.named_modules() if LORA.is_layer(sub))


def shape_key(cfg, unet, encoders: tuple = ()) -> str:
    """Everything the traced step's tensors depend on, hashed."""
    shape = {"unet": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
             "latents": largest_batch_latents(cfg), "batch": cfg.batch_size, "precision": cfg.mixed_precision,
             "checkpointing": cfg.gradient_checkpointing, "min_snr": bool(cfg.min_snr_gamma),
             "lora": _lora_shape(unet), "encoders": [[e.config.to_dict(), _lora_shape(e)] for e in encoders],
             "versions": _versions(), "code": _code_hash()}
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cache_path() -> Path:
    from ..disk.cache import cache_root
    return cache_root() / CACHE_FILE


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict) -> None:
    from ..disk.atomic import write_text
    cache = _read_cache()
    cache[key] = entry
    try:
        _cache_path().parent.mkdir(parents=True, exist_ok=True)
        write_text(_cache_path(), json.dumps(cache, indent=1, sort_keys=True))
    except OSError:  # a read-only cache folder: the plan is still right, only slower next time
        pass


def step_activations(cfg, unet, scheduler=None, use_cache: bool = True, encoders: tuple = ()) -> dict:
    """The traced activations of ``cfg``'s largest training step for ``unet`` (on the
    meta device with the run's adapter; it is turned into fake tensors in place):
    {"activation_bytes", "rounding_bytes", "workspace_bytes", "trace", "cached"}."""
    from .. import sdxl
    from ..loss import Objective
    from ..precision import weight_dtype
    from .trace import trace_step

    key = shape_key(cfg, unet, encoders)
    if use_cache and key in (cache := _read_cache()):
        return _figures(cache[key], cfg.grad_accum, cached=True)
    if scheduler is None:
        from diffusers import DDPMScheduler
        scheduler = DDPMScheduler.from_config(sdxl.load_config("sdxl_scheduler"))
    c = unet.config
    text = (77, c.cross_attention_dim, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim)
    started = time.perf_counter()
    t = trace_step(unet, cfg.batch_size, largest_batch_latents(cfg), weight_dtype(cfg.mixed_precision),
                   cfg.gradient_checkpointing, Objective.of(cfg), scheduler, text_dims=text, encoders=encoders)
    entry = {**t, "latents": list(largest_batch_latents(cfg)), "batch": cfg.batch_size,
             "trace_seconds": round(time.perf_counter() - started, 1)}
    _write_cache(key, entry)
    return _figures(entry, cfg.grad_accum, cached=False)


def _figures(t: dict, grad_accum: int, cached: bool) -> dict:
    """The plan's activation and margin figures from a trace. The plan counts the LoRA's
    gradients in full; the activations are what the step's peak holds beyond them. With
    one micro-batch per step the gradients appear during the backward, so the peak holds
    only some of them: activations = peak - gradients. With more, the later micro-batches
    run with every gradient allocated: activations = the peak of all else."""
    if grad_accum == 1:
        raw, cuda = t["peak_bytes"] - t["grad_bytes"], t["peak_bytes_cuda"] - t["grad_bytes"]
    else:
        raw, cuda = t["activation_peak_bytes"], t["activation_peak_bytes_cuda"]
    return {"activation_bytes": raw, "rounding_bytes": cuda - raw, "workspace_bytes": CUDA_WORKSPACE_BYTES,
            "trace": {k: t[k] for k in ("peak_bytes", "activation_peak_bytes", "grad_bytes", "tensors", "latents",
                                        "batch", "trace_seconds")},
            "cached": cached}
