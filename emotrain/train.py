"""The training loop: one SDXL LoRA run, top to bottom."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler

from . import checkpoint, lora_files, report
from .batches import Batches, collate, encode_examples
from .config import TrainConfig
from .data import resolve_data, scan_folder
from .errors import UserError
from .optimizers import build_optimizer, parse_optim_args, takes_loss
from .progress import TrainProgress
from .sdxl import add_lora, denoising_loss, encode_prompts, load_sdxl, text_encoder_lora_config, unet_lora_config

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingStopped(UserError):
    """The run stopped early (interrupt, NaN loss); a checkpoint was saved."""


def setup_lora(sdxl, cfg: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """Bake any base LoRAs into the frozen weights, inject the new LoRA (fresh, or from
    --network-weights) and return the trainable parameters by name."""
    if cfg.base_lora:
        from .stacking import apply_base_loras, load_weighted
        apply_base_loras(sdxl.unet, sdxl.text_encoders, load_weighted(cfg.base_lora, sdxl.unet.config))
    start = lora_files.load_lora_file(cfg.network_weights) if cfg.network_weights else None
    components = {"unet": sdxl.unet}
    if cfg.train_text_encoders:
        components.update(text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2)
    named = {}
    for prefix, module in components.items():
        config = lora_files.lora_config_for(start, prefix) if start is not None else None
        if config is not None:
            pass
        elif prefix == "unet":
            config = unet_lora_config(cfg.rank, cfg.effective_alpha, cfg.effective_conv_rank, cfg.effective_conv_alpha)
        else:
            config = text_encoder_lora_config(cfg.rank, cfg.effective_alpha)
        add_lora(module, config)
        named.update({f"{prefix}.{n}": p for n, p in module.named_parameters() if p.requires_grad})
    if start is not None:
        lora_files.load_into_model(sdxl.unet, sdxl.text_encoders if cfg.train_text_encoders else None, start)
    if cfg.gradient_checkpointing:
        sdxl.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoders:
            for te in sdxl.text_encoders:
                te.gradient_checkpointing_enable()
    return named


def step_loss(sdxl, unet, batch, cfg: TrainConfig, noise_generator) -> torch.Tensor:
    """The loss of one micro-batch."""
    if "prompt_embeds" in batch:
        embeds, pooled = batch["prompt_embeds"], batch["pooled"]
    else:
        embeds, pooled = encode_prompts(sdxl, batch["captions"], batch["latents"].device)
    return denoising_loss(unet, sdxl.noise_scheduler, batch["latents"], embeds, pooled, batch["time_ids"],
                          noise_generator, cfg.noise_offset, cfg.min_snr_gamma)


def train(cfg: TrainConfig, resume: Path | None = None) -> dict:
    output = Path(cfg.output).expanduser()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    device = accelerator.device
    progress = TrainProgress(cfg.steps, enabled=accelerator.is_local_main_process)

    with progress.task("loading model"):
        sdxl = load_sdxl(cfg.model, WEIGHT_DTYPES[cfg.mixed_precision])
        torch.manual_seed(cfg.seed)  # the LoRA's initial weights
        named_params = setup_lora(sdxl, cfg)
        params = list(named_params.values())
        for module in (sdxl.unet, sdxl.vae, *sdxl.text_encoders):
            module.to(device)
    examples = scan_folder(resolve_data(cfg.data))
    with progress.task("encoding images", total=len(set(examples))) as advance:
        encoded = encode_examples(sdxl, examples, cfg.resolution, device, cfg.seed,
                                  cache_text=not cfg.train_text_encoders, progress=advance)
    if not cfg.train_text_encoders:  # no longer needed: free their memory
        sdxl.text_encoder.to("meta"), sdxl.text_encoder_2.to("meta")
    sdxl.vae.to("meta")

    optimizer = build_optimizer(cfg.optim, params, cfg.lr, cfg.shadow, parse_optim_args(cfg.optim_args))
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                 num_training_steps=cfg.steps)
    unet, optimizer = accelerator.prepare(sdxl.unet, optimizer)
    inner_optimizer = optimizer.optimizer
    batches = Batches(len(encoded), cfg.batch_size, cfg.seed)
    noise_generator = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if resume is not None:
        meta = checkpoint.restore_checkpoint(resume, named_params=named_params, optimizer=inner_optimizer,
                                             lr_scheduler=lr_scheduler, scaler=accelerator.scaler,
                                             noise_generator=noise_generator)
        step = meta["step"]
        batches = Batches(len(encoded), cfg.batch_size, cfg.seed, meta["data"]["epoch"], meta["data"]["position"])
        progress.console.print(f"resumed from {resume} at step {step}")
    run = {"config": cfg.to_dict(), "model_source": sdxl.source, "versions": report.versions(),
           "lora_params": sum(p.numel() for p in params), "lora_tensors": len(params),
           "examples": len(examples), "started_at": time.time(), "resumed_from": str(resume) if resume else None}
    report.write_json(output / "run.json", {**run, "status": "running"})

    def save(at_step, data_state, noise_state):
        current = noise_generator.get_state()
        noise_generator.set_state(noise_state)
        try:
            return checkpoint.save_checkpoint(
                output / "checkpoints", step=at_step, named_params=named_params, optimizer=inner_optimizer,
                lr_scheduler=lr_scheduler, scaler=accelerator.scaler, data_state=data_state,
                noise_generator=noise_generator, config=cfg.to_dict(), info={"versions": run["versions"]},
                keep=cfg.keep_checkpoints)
        finally:
            noise_generator.set_state(current)

    losses, emotion, started, first_step = [], [], time.perf_counter(), step
    with progress:
        while step < cfg.steps:
            # Where this step starts from: a stop inside the step resumes from here.
            data_state, noise_state = batches.state_dict(), noise_generator.get_state()
            try:
                micro_losses = []
                for micro in range(cfg.grad_accum):
                    last = micro == cfg.grad_accum - 1
                    batch = collate([encoded[i] for i in batches.next()], device)
                    with (nullcontext() if last else accelerator.no_sync(unet)), accelerator.autocast():
                        loss = step_loss(sdxl, unet, batch, cfg, noise_generator)
                        if not torch.isfinite(loss):
                            where = save(step, data_state, noise_state)
                            raise TrainingStopped(f"loss became {loss.item()} at step {step + 1}: stopped; the last good "
                                                  f"state is checkpoint {where} (--resume {output} continues "
                                                  "from it; if the run diverged, start again with a lower --lr)")
                        accelerator.backward(loss / cfg.grad_accum)
                    micro_losses.append(loss.detach())
                mean_loss = torch.stack(micro_losses).mean().item()
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                # Through accelerate (and its GradScaler) only a closure reaches the optimizer;
                # the Emo family reads the step's loss from it.
                optimizer.step(lambda: mean_loss)
                if not accelerator.optimizer_step_was_skipped:
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            except KeyboardInterrupt:
                where = save(step, data_state, noise_state)
                raise TrainingStopped(f"interrupted at step {step}; resume with: emotrain sdxl-lora --resume {output}"
                                      f"  (checkpoint {where})") from None
            step += 1
            losses.append(mean_loss)
            s = inner_optimizer.emotion.s if takes_loss(inner_optimizer) else None
            emotion.append(s)
            progress.update(step, mean_loss, s, lr_scheduler.get_last_lr()[0])
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save(step, batches.state_dict(), noise_generator.get_state())

    final = save(step, batches.state_dict(), noise_generator.get_state())
    elapsed = time.perf_counter() - started
    weights = lora_files.lora_weights_from_model(sdxl.unet, sdxl.text_encoders if cfg.train_text_encoders else None)
    metadata = report.training_metadata(cfg, step, sdxl.source, run["started_at"])
    lora_files.save_kohya(output / "lora.safetensors", weights, metadata, unet_config=sdxl.unet.config)
    lora_files.save_diffusers(output / "pytorch_lora_weights.safetensors", weights, metadata)
    memory = report.memory_report(device, inner_optimizer, params, (sdxl.unet,))
    summary = {**run, "status": "finished", "steps": step, "steps_this_run": step - first_step,
               "seconds": elapsed, "steps_per_second": (step - first_step) / elapsed if elapsed else None,
               "losses": losses, "emotion_scalar": emotion, "final_loss": losses[-1] if losses else None,
               "should_stop": bool(inner_optimizer.emotion.should_stop) if takes_loss(inner_optimizer) else None,
               "checkpoint": str(final), "memory": memory,
               "files": {"kohya": str(output / "lora.safetensors"),
                         "diffusers": str(output / "pytorch_lora_weights.safetensors")}}
    report.write_json(output / "run.json", summary)
    progress.summary(summary)
    return summary
