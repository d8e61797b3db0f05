"""run.json from a run's first step to its last word.

It holds the whole loss and emotion history: a checkpoint carries the history up to its
step, so a resumed run's run.json continues it rather than starting over. The status is
written on every way out: ``finished``, ``interrupted`` (Ctrl-C, SIGTERM), ``stopped-nan``
(the loss or the training state became non-finite), ``stopped-input`` (an input file
went away during training) or ``error`` (with the message).
Only the main process writes. Also here: the package versions, the measured memory (beside
the plan: memory.py, written with every status), and
the training notes a LoRA file's header carries (``training_metadata``).
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from ..disk.atomic import write_text
from ..disk.layout import RunFolder
from ..options import shareable
from ..sources import model_name



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
    import torch
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def memory_report(device, optimizer, lora_params, frozen_modules) -> dict:
    """Measured memory: on CUDA the allocator's peaks, split where we can count; on CPU
    the optimizer's allocated state and the process's peak resident set."""
    from optim import state_nbytes

    from ..vram import cuda_memory_report, process_peak_rss_bytes

    report = {
        "device": str(device),
        "optimizer_state_bytes": state_nbytes(optimizer),
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


def dataset_metadata(scanned) -> dict:
    """sd-scripts' header entries about the data, from the draws of an epoch (the images
    trained on; --val-split's are not): per folder (by name, as sd-scripts keys them) its
    repeats and image count (``ss_dataset_dirs``, ``ss_reg_dataset_dirs``) and the tag counts
    of its captions (``ss_tag_frequency``), and the images times their repeats
    (``ss_num_train_images``, ``ss_num_reg_images``); and the training resolution as
    modelspec writes it (WIDTHxHEIGHT, of the first dataset)."""
    from ..dataset.scan import count_tags

    examples = {}
    for entry in scanned.entries:
        examples.setdefault(entry.example.subset, {})[entry.example.image] = entry.example.caption
    dirs, reg_dirs, tags, counts = {}, {}, {}, {False: 0, True: 0}
    for subset, captions in examples.items():
        table = reg_dirs if subset.is_reg else dirs
        seen = table.setdefault(subset.name, {"n_repeats": subset.num_repeats, "img_count": 0})
        seen["img_count"] += len(captions)
        count_tags(tags.setdefault(subset.name, {}), captions.values())
        counts[subset.is_reg] += len(captions) * subset.num_repeats
    return {"ss_dataset_dirs": json.dumps(dirs), "ss_reg_dataset_dirs": json.dumps(reg_dirs),
            "ss_tag_frequency": json.dumps(tags), "ss_num_train_images": str(counts[False]),
            "ss_num_reg_images": str(counts[True]),
            "modelspec.resolution": "{}x{}".format(*scanned.specs[0].resolution)}


def modelspec(cfg, when: float) -> dict:
    """The modelspec entries sd-scripts writes beside the architecture and the resolution
    (ModelSpec 1.0.1): the title (the output's name), the date the file was written (local
    ISO-8601, to the second, as sd-scripts) and what made it."""
    import datetime

    return {"modelspec.title": Path(cfg.output).name or "LoRA",
            "modelspec.date": datetime.datetime.fromtimestamp(int(when)).isoformat(),
            "modelspec.implementation_version": f"emotrain/{versions().get('emotrain') or 'unknown'}"}


def training_metadata(cfg, steps: int, started_at: float, schedule=None, lrs: dict | None = None) -> dict:
    """sd-scripts' ss_* training notes (what A1111/ComfyUI show about a LoRA), plus our
    whole config so a file says how it was made. LoRA files get shared: local files and
    folders appear by name, never by path (``options.shareable``). ``schedule``: the noise
    scheduler's config (prediction type, zero terminal SNR) the run trained with; ``lrs``:
    each part's learning rate (run/groups.py)."""
    lrs = lrs or {"unet": cfg.lr, "text_encoder": cfg.lr, "text_encoder_2": cfg.lr}
    te_lrs = sorted({lrs["text_encoder"], lrs["text_encoder_2"]}, key=[lrs["text_encoder"], lrs["text_encoder_2"]].index)
    v_pred = bool(schedule and schedule.get("prediction_type") == "v_prediction")
    return {
        "ss_training_started_at": str(started_at),
        "ss_output_name": Path(cfg.output).name,
        "ss_sd_model_name": Path(model_name(cfg.model)).name,  # sd-scripts: the model's file or folder name
        "ss_learning_rate": str(cfg.lr),
        "ss_unet_lr": str(lrs["unet"]),
        "ss_text_encoder_lr": (str(te_lrs[0]) if len(te_lrs) == 1 else str(te_lrs)) if cfg.train_text_encoders else "0",
        "ss_loraplus_lr_ratio": str(cfg.loraplus_ratio),
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
        "ss_v_parameterization": str(v_pred),
        "ss_zero_terminal_snr": str(bool(schedule and schedule.get("rescale_betas_zero_snr"))),
        "ss_scale_v_pred_loss_like_noise_pred": str(cfg.scale_v_pred_loss_like_noise_pred),
        "ss_loss_type": cfg.loss_type,
        "ss_huber_c": str(cfg.huber_c),
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_debiased_estimation": str(cfg.debiased_estimation),
        "ss_min_timestep": str(cfg.min_timestep),
        "ss_max_timestep": str(cfg.max_timestep or (schedule or {}).get("num_train_timesteps", 1000)),
        "ss_ip_noise_gamma": str(cfg.ip_noise_gamma or None),
        "ss_multires_noise_iterations": str(cfg.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(cfg.multires_noise_discount),
        "ss_noise_offset_random_strength": str(cfg.noise_offset_random_strength),
        "ss_network_dropout": str(cfg.network_dropout or None),  # sd-scripts': None when off
        "ss_rank_dropout": str(cfg.rank_dropout or None),
        "ss_module_dropout": str(cfg.module_dropout or None),
        "ss_scale_weight_norms": str(cfg.scale_weight_norms),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "emotrain_version": versions().get("emotrain") or "",
        "emotrain_config": json.dumps(shareable(cfg.to_dict()), sort_keys=True),  # names, not paths
    }




class RunRecord:
    def __init__(self, folder: RunFolder, info: dict, enabled: bool, history: dict | None = None,
                 step: int = 0, memory=None):
        self.folder, self.info, self.enabled = folder, info, enabled
        self.memory = memory  # -> run.json's "memory" as it stands (memory.record), on every write
        history = history or {}
        known = step - len(history.get("losses", [])[:step])  # a checkpoint from before histories: unknown
        self.losses = [None] * known + list(history.get("losses", []))[:step]
        self.emotion = [None] * known + list(history.get("emotion_scalar", []))[:step]
        self.outcome: dict = {}

    def add(self, loss: float, emotion: float | None) -> None:
        self.losses.append(loss)
        self.emotion.append(emotion)

    def history(self) -> dict:
        """What a checkpoint carries, so that a resume continues it."""
        return {"losses": list(self.losses), "emotion_scalar": list(self.emotion)}

    def write(self, status: str, **fields) -> None:
        if self.enabled:
            if self.memory is not None and "memory" not in fields:
                fields = {**fields, "memory": self.memory()}
            write_json(self.folder.run_json, {**self.info, **fields, "status": status, "losses": self.losses,
                                              "emotion_scalar": self.emotion})

    def __enter__(self) -> "RunRecord":
        self.write("running")
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is None:
            return
        if isinstance(exc, KeyboardInterrupt):
            status = "interrupted"
        else:
            status = getattr(exc, "status", "error")
        self.write(status, message=str(exc) or type(exc).__name__, steps=len(self.losses), **self.outcome)
