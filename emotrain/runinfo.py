"""What a run writes about itself: run.json, memory, versions; atomic file writes."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

import torch

from .atomic import write_text

PACKAGES = ("emotrain", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes")


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def memory_report(device: torch.device, optimizer, lora_params, frozen_modules) -> dict:
    """Measured memory: on CUDA the allocator's peaks, split where we can count; on CPU
    the optimizer's allocated state and the process's peak resident set."""
    from .vram import cuda_memory_report, measure_state_bytes, process_peak_rss_bytes

    report = {
        "device": str(device),
        "optimizer_state_bytes": measure_state_bytes(optimizer),
        "lora_param_bytes": tensor_bytes(lora_params),
        "frozen_weight_bytes": tensor_bytes(p for m in frozen_modules for p in m.parameters() if not p.requires_grad),
        "process_peak_rss_bytes": process_peak_rss_bytes(),
    }
    cuda = cuda_memory_report(device) if device.type == "cuda" else None
    if cuda:
        report["cuda_peak_allocated_bytes"] = cuda["peak_allocated_bytes"]
        report["cuda_peak_reserved_bytes"] = cuda["peak_reserved_bytes"]
        # LoRA weights and their gradients, optimizer state and frozen weights are counted;
        # the rest of the peak is activations and workspace.
        known = report["optimizer_state_bytes"] + 2 * report["lora_param_bytes"] + report["frozen_weight_bytes"]
        report["cuda_activations_bytes_estimate"] = max(0, cuda["peak_allocated_bytes"] - known)
    return report


def training_metadata(cfg, steps: int, model_source: str, started_at: float) -> dict:
    """sd-scripts' ss_* training notes (what A1111/ComfyUI show about a LoRA), plus our
    whole config so a file says how it was made."""
    return {
        "ss_training_started_at": str(started_at),
        "ss_output_name": Path(cfg.output).name,
        "ss_sd_model_name": Path(model_source).name,
        "ss_learning_rate": str(cfg.lr),
        "ss_unet_lr": str(cfg.lr),
        "ss_text_encoder_lr": str(cfg.lr if cfg.train_text_encoders else 0),
        "ss_max_train_steps": str(cfg.steps),
        "ss_steps": str(steps),
        "ss_optimizer": cfg.optim + (" (use_shadow=True)" if cfg.shadow and cfg.optim.startswith("emo") else ""),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.warmup_steps),
        "ss_seed": str(cfg.seed),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "emotrain_version": versions().get("emotrain") or "",
        "emotrain_config": json.dumps(cfg.to_dict(), sort_keys=True),
    }
