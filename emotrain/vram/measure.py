"""Measured memory: what a process really holds, and real steps that check the plan."""

from __future__ import annotations

import gc
from contextlib import nullcontext
import resource
import sys

import torch

from .. import sdxl
from ..lora.inject import lora_config_for_run, random_lora_unet
from ..loss import Objective, check_schedule
from ..optimizers import build_optimizer, parse_optim_args, takes_loss
from ..precision import weight_dtype
from .plan import network_lora_configs, parse_optims, plan, plan_rows, row_key, shadow_settings
from optim import state_nbytes

# Loss added to what the optimizer is told on step 2 of a shadow-on measurement: the
# shadow buffer appears only once |s| > 0.1, which random data need not reach in a few
# steps; this jump makes s ~ 1 on step 2 while the gradients stay the real ones.
EMOTION_JUMP = 10.0


def process_peak_rss_bytes() -> int:
    """Peak resident set size of this process."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def cuda_memory_report(device=None) -> dict | None:
    """Peak CUDA memory allocated and reserved by torch since the last reset, or None
    without CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.type != "cuda":
        return None
    return {"device": torch.cuda.get_device_name(device),
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device))}


def _has_shadow(opt) -> bool:
    return any(isinstance(st, dict) and "shadow" in st for st in opt.state.values())


def _random_batch(config, batch_size: int, resolution: int | None, device, generator):
    side = (resolution // 8) if resolution else config.sample_size
    time_dim = 6 * config.addition_time_embed_dim
    shapes = {"latents": (batch_size, config.in_channels, side, side),
              "hidden": (batch_size, 77, config.cross_attention_dim),
              "pooled": (batch_size, config.projection_class_embeddings_input_dim - time_dim)}
    batch = {k: torch.randn(s, generator=generator).to(device) for k, s in shapes.items()}
    batch["time_ids"] = torch.tensor([side * 8, side * 8, 0, 0, side * 8, side * 8],
                                     dtype=torch.float32).repeat(batch_size, 1).to(device)
    return batch


def measured_schedule(cfg, model: str):
    """The prediction type and zero terminal SNR the run would train with: as training
    reads them (``sdxl.model_schedule``: the model's own, the flags winning); ``sdxl``
    (random weights, no model to read) from the flags alone."""
    if model == "sdxl":
        v = bool(cfg.v_parameterization or cfg.zero_terminal_snr or cfg.scale_v_pred_loss_like_noise_pred)
        return sdxl.Schedule("v_prediction" if v else "epsilon", bool(cfg.zero_terminal_snr), ())
    schedule = sdxl.model_schedule(sdxl.resolve_model(model), cfg.v_parameterization, cfg.zero_terminal_snr)
    check_schedule(cfg, schedule)  # what training refuses (a v-pred-only option on an epsilon model) is refused here
    return schedule


def measure(cfg, optims=None, shadow=None, steps: int = 3, device: str | None = None, lr: float = 1e-4,
            progress=None) -> dict:
    """Run ``steps`` real training steps per optimizer on the UNet with the run's LoRA
    (batch size, resolution, precision and checkpointing from ``cfg``; random latents
    and conditioning; with --ema-decay, its EMA updated after each step) and compare the optimizer state it really holds with the plan.

    Shadow-on rows tell the optimizer a loss that jumps on step 2 (``EMOTION_JUMP``), so
    the lazily allocated shadow buffer exists by the end (needs steps >= 2); each row says
    on which step the shadow appeared, or that it did not. ``progress``: a TrainProgress
    whose bar (or, without a terminal, plain lines) counts the steps.
    """
    from diffusers import DDPMScheduler

    names = parse_optims(optims or cfg.optim)
    shadow = cfg.shadow if shadow is None else shadow
    rows = plan_rows(names, shadow_settings(shadow))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = weight_dtype(cfg.mixed_precision)
    model = cfg.model or "sdxl"

    planned = plan(cfg.replace(train_text_encoders=False), names, shadow)
    schedule = measured_schedule(cfg, model)
    torch.manual_seed(cfg.seed)
    lora_config = network_lora_configs(cfg).get("unet") or lora_config_for_run(cfg)
    with progress.task("building the UNet") if progress else nullcontext():
        unet = random_lora_unet(model, lora_config, device, dtype)
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    # --ema-decay: the EMA's fp32 copy held and updated as the loop does (run/ema.py)
    ema = [p.detach().to("cpu" if cfg.ema_on_cpu else device, torch.float32, copy=True) for p in params] \
        if cfg.ema_decay else None
    generator = torch.Generator().manual_seed(cfg.seed)
    scheduler = DDPMScheduler.from_config(  # the tiny model shares it
        sdxl.load_config("sdxl_scheduler"), rescale_betas_zero_snr=schedule.zero_terminal_snr,
        prediction_type=schedule.prediction_type)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    args = parse_optim_args(cfg.optim_args)
    objective = Objective.of(cfg)

    results = {}
    phase = progress.task("measuring", total=len(rows) * steps) if progress else nullcontext(lambda n=1: None)
    with phase as advance:
        for name, s in rows:
            key = row_key(name, s)
            for p in params:
                p.grad = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            opt = build_optimizer(name, params, lr, shadow=s, args=args)
            shadow_step, losses = None, []
            for step in range(1, steps + 1):
                batch = _random_batch(unet.config, cfg.batch_size, cfg.resolution, device, generator)
                with autocast:  # the training loop's own loss, on random latents and conditioning
                    loss = objective.loss(unet, scheduler, batch["latents"], batch["hidden"], batch["pooled"],
                                          batch["time_ids"], generator)
                loss.backward()
                value = loss.item()
                losses.append(value)
                if takes_loss(opt):
                    opt.step(loss=value + (EMOTION_JUMP if s and step == 2 else 0.0))
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    torch._foreach_lerp_(ema, [p.detach().to(ema[0].device, torch.float32) for p in params], 1.0 - cfg.ema_decay)
                advance()
                if s and shadow_step is None and _has_shadow(opt):
                    shadow_step = step
            measured = state_nbytes(opt)
            planned_bytes = planned["optimizers"][key]["state_bytes"]
            results[key] = {
                "optimizer": name, "shadow": s, "planned_state_bytes": planned_bytes,
                "measured_state_bytes": measured, "match": measured == planned_bytes,
                "shadow_allocated_step": shadow_step, "losses": losses,
                "cuda": cuda_memory_report(device) if device.type == "cuda" else None,
            }
            del opt
    return {"model": model, "device": str(device), "steps": steps, "rank": cfg.rank,
            "conv_rank": planned["conv_rank"], "targets": cfg.targets, "mixed_precision": cfg.mixed_precision,
            "batch_size": cfg.batch_size, "resolution": cfg.resolution, "prediction_type": schedule.prediction_type,
            "zero_terminal_snr": schedule.zero_terminal_snr,
            "gradient_checkpointing": cfg.gradient_checkpointing, "lora_params": planned["lora_params"],
            # measure holds what a training step holds: the UNet, its LoRA, gradients, state
            "planned_train_step_bytes": {k: v["training_step_bytes"] for k, v in planned["optimizers"].items()},
            # ... and the whole planned peak of a step (activations and margin added)
            "planned_peak_bytes": {k: v["peak_bytes"] for k, v in planned["optimizers"].items()},
            "optimizers": results, "peak_rss_bytes": process_peak_rss_bytes()}
