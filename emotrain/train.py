"""The training loop: one SDXL LoRA run, top to bottom."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.optimization import get_scheduler

from . import checkpoint, report
from .batches import Batches, collate, encode_examples
from .config import TrainConfig
from .data import resolve_data, scan_folder
from .errors import UserError
from .layout import RunFolder
from .formats import FORMATS, load_lora_file
from .formats.model import load_into_model, lora_config_for, lora_weights_from_model
from .optimizers import build_optimizer, parse_optim_args, takes_loss
from .precision import weight_dtype
from .progress import TrainProgress
from .sdxl import add_lora, denoising_loss, encode_prompts, load_sdxl, lora_config_for_run
from .watch.logs import accelerator_settings
from .watch.session import Watch


class TrainingStopped(UserError):
    """The run stopped early (interrupt, NaN loss); a checkpoint was saved."""


class NonFiniteLoss(Exception):
    pass


@dataclass
class Run:
    """Everything a step touches, and everything a checkpoint must hold."""
    cfg: TrainConfig
    accelerator: Accelerator
    sdxl: object
    models: list  # the trained models, as accelerate wrapped them
    named_params: dict[str, torch.nn.Parameter]
    encoded: list
    optimizer: object  # accelerate's wrapper; .optimizer is ours
    lr_scheduler: object
    batches: Batches
    noise: torch.Generator
    watch: Watch
    step: int = 0
    info: dict = field(default_factory=dict)


def setup_lora(sdxl, cfg: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """Bake any base LoRAs into the frozen weights, inject the new LoRA (fresh, or from
    --network-weights) and return the trainable parameters by name."""
    if cfg.base_lora:
        from .stacking import apply_base_loras, load_weighted
        apply_base_loras(sdxl.unet, sdxl.text_encoders, load_weighted(cfg.base_lora, sdxl.unet.config))
    start = load_lora_file(cfg.network_weights) if cfg.network_weights else None
    components = {"unet": sdxl.unet}
    if cfg.train_text_encoders:
        components.update(text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2)
    named = {}
    for prefix, module in components.items():
        config = lora_config_for(start, prefix) if start is not None else None
        add_lora(module, config or lora_config_for_run(cfg, prefix))
        named.update({f"{prefix}.{n}": p for n, p in module.named_parameters() if p.requires_grad})
    if start is not None:
        load_into_model(sdxl.unet, sdxl.text_encoders if cfg.train_text_encoders else None, start)
    if cfg.gradient_checkpointing:
        sdxl.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoders:
            for te in sdxl.text_encoders:
                te.gradient_checkpointing_enable()
    return named


def prepare(cfg: TrainConfig, resume: Path | None, progress: TrainProgress) -> Run:
    """Model with LoRA, encoded data, optimizer and schedule; restored if resuming."""
    # accelerate keeps its settings per process; a second run in one process (the Python
    # API, tests) may use another precision. The distributed part (PartialState) stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, **accelerator_settings(cfg, RunFolder(cfg.output)))
    watch = Watch(cfg, accelerator)  # validation, samples, logs
    device = accelerator.device
    with progress.task("loading model"):
        sdxl = load_sdxl(cfg.model, weight_dtype(cfg.mixed_precision))
        torch.manual_seed(cfg.seed)  # the LoRA's initial weights
        named_params = setup_lora(sdxl, cfg)
        for module in (sdxl.unet, sdxl.vae, *sdxl.text_encoders):
            module.to(device)
    examples = watch.hold_out(scan_folder(resolve_data(cfg.data)))
    with progress.task("encoding images", total=len(set(examples))) as advance:
        encoded = encode_examples(sdxl, examples, cfg.resolution, device, cfg.seed,
                                  cache_text=not cfg.train_text_encoders, bucket=cfg.bucket, progress=advance)
    watch.prepare(sdxl, progress)  # latents are cached: frees (or parks, for samples) the VAE and frozen encoders

    params = list(named_params.values())
    sizes = [tuple(e.latents.shape) for e in encoded]
    optimizer = build_optimizer(cfg.optim, params, cfg.lr, cfg.shadow, parse_optim_args(cfg.optim_args))
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                 num_training_steps=cfg.steps)
    unet, optimizer = accelerator.prepare(sdxl.unet, optimizer)
    models = [unet]
    if cfg.train_text_encoders:  # wrapped too, so their gradients are synchronised across GPUs
        sdxl.text_encoder, sdxl.text_encoder_2 = accelerator.prepare(sdxl.text_encoder, sdxl.text_encoder_2)
        models += [sdxl.text_encoder, sdxl.text_encoder_2]
    run = Run(cfg, accelerator, sdxl, models, named_params, encoded, optimizer, lr_scheduler,
              Batches(sizes, cfg.batch_size, cfg.seed), torch.Generator().manual_seed(cfg.seed), watch)
    run.info = {"model_source": sdxl.source, "versions": report.versions(), "examples": len(examples),
                "lora_params": sum(p.numel() for p in params), "lora_tensors": len(params),
                "resumed_from": str(resume) if resume else None}
    if resume is not None:
        meta = checkpoint.restore_checkpoint(resume, named_params=named_params, optimizer=optimizer.optimizer,
                                             lr_scheduler=lr_scheduler, scaler=accelerator.scaler,
                                             noise_generator=run.noise)
        run.step = meta["step"]
        run.batches = Batches(sizes, cfg.batch_size, cfg.seed, meta["data"]["epoch"], meta["data"]["position"])
        progress.console.print(f"resumed from {resume} at step {run.step}")
    return run


def micro_batch_loss(run: Run) -> torch.Tensor:
    batch = collate([run.encoded[i] for i in run.batches.next()], run.accelerator.device)
    if "prompt_embeds" in batch:
        embeds, pooled = batch["prompt_embeds"], batch["pooled"]
    else:
        embeds, pooled = encode_prompts(run.sdxl, batch["captions"], batch["latents"].device)
    return denoising_loss(run.models[0], run.sdxl.noise_scheduler, batch["latents"], embeds, pooled,
                          batch["time_ids"], run.noise, run.cfg.noise_offset, run.cfg.min_snr_gamma)


def optimizer_step(run: Run) -> float:
    """Accumulate gradients over the micro-batches, then one optimizer step; returns the
    step's loss (the mean over micro-batches), which the Emo family also receives."""
    cfg, accelerator = run.cfg, run.accelerator
    losses = []
    for micro in range(cfg.grad_accum):
        with ExitStack() as context:
            if micro < cfg.grad_accum - 1:  # gradients are synchronised once, on the last one
                for model in run.models:
                    context.enter_context(accelerator.no_sync(model))
            context.enter_context(accelerator.autocast())
            loss = micro_batch_loss(run)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(loss.item())
            accelerator.backward(loss / cfg.grad_accum)
        losses.append(loss.detach())
    step_loss = torch.stack(losses).mean().item()
    norm = accelerator.clip_grad_norm_(list(run.named_params.values()), cfg.max_grad_norm) if cfg.max_grad_norm else None
    run.watch.before_update(run, norm)
    # Through accelerate (and its GradScaler) only a closure reaches the optimizer.
    run.optimizer.step(lambda: step_loss)
    if not accelerator.optimizer_step_was_skipped:
        run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss


def save(run: Run, data_state: dict | None = None, noise_state: torch.Tensor | None = None) -> Path:
    """A checkpoint of the run after ``run.step`` steps (by default: where it is now).
    Every process holds the same state; the main one writes it."""
    folder = RunFolder(run.cfg.output)
    run.accelerator.wait_for_everyone()
    if not run.accelerator.is_main_process:
        return folder.checkpoint(run.step)
    return checkpoint.save_checkpoint(
        folder.checkpoints, step=run.step, named_params=run.named_params,
        optimizer=run.optimizer.optimizer, lr_scheduler=run.lr_scheduler, scaler=run.accelerator.scaler,
        data_state=data_state or run.batches.state_dict(), noise_state=run.noise.get_state() if noise_state is None else noise_state,
        config=run.cfg.to_dict(), info={"versions": run.info["versions"]}, keep=run.cfg.keep_checkpoints)


def save_lora(run: Run, output: Path) -> dict:
    """The trained LoRA in every registered format, each under the format's file name."""
    cfg, sdxl = run.cfg, run.sdxl
    text_encoders = [run.accelerator.unwrap_model(te) for te in run.models[1:]] or None
    weights = lora_weights_from_model(sdxl.unet, text_encoders)
    metadata = report.training_metadata(cfg, run.step, sdxl.source, run.info["started_at"])
    return {name: str(fmt.write(output / fmt.file_name, weights, metadata, unet_config=sdxl.unet.config))
            for name, fmt in FORMATS.items()}


def train(cfg: TrainConfig, resume: Path | None = None) -> dict:
    folder = RunFolder(cfg.output)
    output = folder.root
    progress = TrainProgress(cfg.steps)
    run = prepare(cfg, resume, progress)
    progress.enabled(run.accelerator.is_local_main_process)
    optimizer = run.optimizer.optimizer
    run.info.update(config=cfg.to_dict(), started_at=time.time())
    main = run.accelerator.is_main_process
    if main:
        report.write_json(folder.run_json, {**run.info, "status": "running"})

    run.watch.begin(run, resumed=resume is not None)
    losses, emotion, first_step, started = [], [], run.step, time.perf_counter()
    with progress:
        while run.step < cfg.steps:
            # Where this step starts: a stop inside it resumes from here.
            data_state, noise_state = run.batches.state_dict(), run.noise.get_state()
            try:
                loss = optimizer_step(run)
            except (KeyboardInterrupt, NonFiniteLoss) as stop:
                where = save(run, data_state, noise_state)
                run.watch.end(run)  # the report shows how far it got (and how it diverged)
                if isinstance(stop, KeyboardInterrupt):
                    raise TrainingStopped(f"interrupted at step {run.step}; checkpoint {where}; "
                                          f"continue with: emotrain sdxl-lora --resume {output}") from None
                raise TrainingStopped(f"loss became {stop.args[0]} at step {run.step + 1}: stopped; the last good "
                                      f"state is checkpoint {where} (--resume {output} continues from it; "
                                      "if the run diverged, start again with a lower --lr)") from None
            run.step += 1
            losses.append(loss)
            emotion.append(optimizer.emotion.s if takes_loss(optimizer) else None)
            progress.update(run.step, loss, emotion[-1], run.lr_scheduler.get_last_lr()[0])
            run.watch.after_step(run, loss)  # logs; validation and samples when due
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step < cfg.steps:
                save(run)

    elapsed = time.perf_counter() - started
    final = save(run)
    summary = {**run.info, "status": "finished", "steps": run.step, "steps_this_run": run.step - first_step,
               "seconds": elapsed, "steps_per_second": (run.step - first_step) / elapsed if elapsed else None,
               "losses": losses, "emotion_scalar": emotion, "final_loss": losses[-1] if losses else None,
               "should_stop": bool(optimizer.emotion.should_stop) if takes_loss(optimizer) else None,
               "checkpoint": str(final), "files": save_lora(run, output) if main else {},
               "memory": report.memory_report(run.accelerator.device, optimizer, run.named_params.values(),
                                              [run.sdxl.unet])}
    if main:
        report.write_json(folder.run_json, summary)
        progress.summary(summary)
    summary["report"] = run.watch.end(run)
    return summary
