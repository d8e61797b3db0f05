"""The training loop: one SDXL LoRA run, top to bottom."""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.optimization import get_scheduler
from safetensors import SafetensorError

from ..disk import checkpoint
from . import processes
from .groups import param_groups
from .batches import Batches
from .ema import ema_for_run
from ..config import TrainConfig
from ..dataset.encode import prepare_data
from ..dataset.loader import TrainingData
from ..dataset.scan import scan_data
from ..errors import InputLost, Interrupted, NonFiniteLoss, NonFiniteState, PeerLost, TrainingStopped, UserError
from ..disk.layout import RunFolder
from ..lora.formats import FORMATS
from ..lora.dropout import install as install_dropout
from ..lora.live import lora_weights_from_model
from ..lora import maxnorm
from ..lora.start import read_loras, setup_lora
from ..loss import Objective, check_schedule
from ..optimizers import (build_optimizer, check_optimizer, evaluation_point, lr_schedule, parse_optim_args,
                          restore_train_point, takes_loss)
from ..precision import weight_dtype
from ..watch.progress import TrainProgress
from . import memory, record as records
from .record import RunRecord
from ..sdxl import check_compiler, encode_prompts, load_sdxl, model_schedule, resolve_model, time_ids
from .signals import StopRequests
from ..watch.checks import check_samplers_for
from ..watch.logs import accelerator_settings
from ..watch.session import Watch


@dataclass
class Run:
    """Everything a step touches, and everything a checkpoint must hold."""
    cfg: TrainConfig
    accelerator: Accelerator
    sdxl: object
    models: list  # the trained models, as accelerate wrapped them
    named_params: dict[str, torch.nn.Parameter]
    data: TrainingData
    optimizer: object  # accelerate's wrapper; .optimizer is ours
    lr_scheduler: object
    batches: Batches
    noise: torch.Generator
    stops: StopRequests
    trace: processes.Trace
    watch: Watch  # validation, samples, logs
    objective: Objective  # the loss (loss.py), shared with validation
    step: int = 0
    info: dict = field(default_factory=dict)
    history: dict | None = None  # the losses up to the checkpoint resumed from
    lost: InputLost | None = None  # an input file gone in this step (a multi-process run stops at its end)
    ema: object = None  # --ema-decay: the EMA of the LoRA (ema.py)
    dropout: object = None  # lora/dropout.py's Dropout where --network/rank/module-dropout are on
    max_norm: list | None = None  # the LoRA factors --scale-weight-norms scales (lora/maxnorm.py)
    scalars: dict = field(default_factory=dict)  # the step's own figures for the logs (max-norm)
    header: dict = field(default_factory=dict)  # the data's entries in the LoRA's header (record.py)


def prepare(cfg: TrainConfig, resume: Path | None, progress: TrainProgress, stops: StopRequests) -> Run:
    """Model with LoRA, encoded data, optimizer and schedule; restored if resuming."""
    # accelerate keeps its settings per process; a second run in one process (the Python
    # API, tests) may use another precision. The distributed part (PartialState) stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=processes.cpu_only_processes(),
                              **accelerator_settings(cfg, RunFolder(cfg.output)))
    watch = Watch(cfg, accelerator)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    # What can fail without the model fails first: the data (and, with --strict-data, its
    # warnings), the optimizer and its arguments, the LoRA files.
    with accelerator.main_process_first():  # what is built or downloaded once (demo images, tiny model)
        scanned = watch.hold_out(scan_data(cfg))  # --val-split images are never trained on
        source = resolve_model(cfg.model)
    schedule = model_schedule(source, cfg.v_parameterization, cfg.zero_terminal_snr)
    check_schedule(cfg, schedule)
    check_samplers_for(cfg, schedule.zero_terminal_snr)
    check_optimizer(cfg.optim, cfg.lr, cfg.shadow, parse_optim_args(cfg.optim_args), device)
    if cfg.compile:  # a platform that cannot compile says so now, in one line
        check_compiler(device)
    loras = read_loras(cfg)
    with progress.task("loading model"):
        sdxl = load_sdxl(source, weight_dtype(cfg.mixed_precision), schedule=schedule)
        torch.manual_seed(cfg.seed)  # the LoRA's initial weights
        named_params = setup_lora(sdxl, cfg, loras)
        trained = [sdxl.unet, *(sdxl.text_encoders if cfg.train_text_encoders else [])]
        dropout = install_dropout(trained, cfg.network_dropout, cfg.rank_dropout, cfg.module_dropout)
        for module in (sdxl.unet, sdxl.vae, *sdxl.text_encoders):
            module.to(device)
    scanned.show(progress.console)
    for note in schedule.notes:
        progress.console.print(note)
    with accelerator.main_process_first():  # with the disk cache, one process encodes and the others load
        data = prepare_data(sdxl, scanned, cfg, device, progress, progress.console, watch.keeps_encoders)
    watch.prepare(sdxl, data, progress)  # the validation set encoded; encoders freed, or parked for samples
    if cfg.record_draws and accelerator.is_main_process:
        data.record_to(RunFolder(cfg.output).draws)

    params = list(named_params.values())
    lr_kind, warmup = lr_schedule(cfg.optim, cfg.lr_scheduler, cfg.warmup_steps)  # schedule-free: its own warm-up
    optimizer = build_optimizer(cfg.optim, param_groups(cfg, named_params), cfg.lr, cfg.shadow,
                                parse_optim_args(cfg.optim_args), warmup_steps=cfg.warmup_steps)
    if hasattr(optimizer, "sync_loss"):
        optimizer.sync_loss = False  # the loop hands it the loss already averaged over processes
    lr_scheduler = get_scheduler(lr_kind, optimizer, num_warmup_steps=warmup, num_training_steps=cfg.steps)
    unet, optimizer = accelerator.prepare(sdxl.unet, optimizer)
    models = [unet]
    if cfg.train_text_encoders:  # wrapped too, so their gradients are synchronised across GPUs
        sdxl.text_encoder, sdxl.text_encoder_2 = accelerator.prepare(sdxl.text_encoder, sdxl.text_encoder_2)
        models += [sdxl.text_encoder, sdxl.text_encoder_2]
    run = Run(cfg, accelerator, sdxl, models, named_params, data, optimizer, lr_scheduler,
              Batches(data.keys, data.batch_sizes, cfg.seed, rank=rank, world=world),
              torch.Generator().manual_seed(processes.noise_seed(cfg.seed, rank)), stops,
              processes.Trace(cfg.output, rank), watch, Objective.of(cfg), dropout=dropout,
              max_norm=maxnorm.lora_factors(trained) if cfg.scale_weight_norms else None,
              header=records.dataset_metadata(scanned))
    run.ema = ema_for_run(cfg, named_params, optimizer.optimizer, device)  # from the starting weights
    folder = RunFolder(cfg.output)
    run.info = {"model_source": sdxl.source, "versions": records.versions(), "examples": len(data.entries),
                "data": scanned.summary, "lora_params": sum(p.numel() for p in params), "lora_tensors": len(params),
                "prediction_type": schedule.prediction_type, "zero_terminal_snr": schedule.zero_terminal_snr,
                "processes": world, "effective_batch_size": cfg.batch_size * cfg.grad_accum * world,
                "resumed_from": folder.relative(resume) if resume else None,
                "ema": {"decay": cfg.ema_decay, "device": str(run.ema.device), "bytes": run.ema.nbytes} if run.ema
                else None}
    progress.console.print(processes.effective_batch_line(
        cfg.batch_size, cfg.grad_accum, world))
    if resume is not None:
        meta = checkpoint.restore_checkpoint(resume, named_params=named_params, optimizer=optimizer.optimizer,
                                             lr_scheduler=lr_scheduler, scaler=accelerator.scaler,
                                             noise_generator=run.noise, rank=rank, ema=run.ema)
        restore_train_point(optimizer.optimizer)  # schedule-free: the training iterate the checkpoint kept
        run.step, run.history = meta["step"], meta.get("history")
        run.batches = Batches(data.keys, data.batch_sizes, cfg.seed, meta["data"]["epoch"], meta["data"]["position"],
                              rank=rank, world=world)
        progress.console.print(f"resumed from {resume} at step {run.step}")
        if meta.get("processes", 1) != world or not meta["noise_restored"]:
            progress.console.print(f"note: the checkpoint was written by {meta.get('processes', 1)} process(es), "
                                   f"this run has {world}: it continues, but not bit-identically to an "
                                   "uninterrupted run")
    return run


def stand_in_loss(run: Run, device) -> torch.Tensor:
    """A zero loss through the trained models on a blank input: what a process whose input
    file is gone trains on, so that its gradient collectives still meet the others'; the
    step is then not taken (``optimizer_step``)."""
    config = run.sdxl.unet.config
    latents = torch.zeros(1, config.in_channels, 8, 8, device=device)
    if run.cfg.train_text_encoders:
        embeds, pooled = encode_prompts(run.sdxl, [""], device, run.cfg.max_token_length)
    else:
        embeds = torch.zeros(1, 77, config.cross_attention_dim, device=device)
        pooled = torch.zeros(1, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim,
                             device=device)
    ids = time_ids((64, 64), (0, 0), (64, 64))[None].to(device)
    return 0 * run.objective.loss(run.models[0], run.sdxl.noise_scheduler, latents, embeds, pooled, ids,
                                  torch.Generator().manual_seed(0))


def micro_batch_loss(run: Run) -> torch.Tensor:
    indices = run.batches.next()
    try:
        batch = run.data.batch(indices, run.noise, step=run.step + 1)  # per-draw choices from run.noise
    except InputLost as lost:
        if run.accelerator.num_processes == 1:
            raise
        run.lost = run.lost or lost  # the processes stop together at the step's end
        return stand_in_loss(run, run.accelerator.device)
    embeds, pooled = batch.prompt_embeds, batch.pooled
    if embeds is None:  # captions change per draw, or the text encoders train
        embeds, pooled = encode_prompts(run.sdxl, batch.captions, batch.latents.device, run.cfg.max_token_length)
    loss = run.objective.loss(run.models[0], run.sdxl.noise_scheduler, batch.latents, embeds, pooled, batch.time_ids,
                              run.noise, weight=batch.weight)
    if run.trace.path:  # its loss.item() is a host sync: only when tracing
        run.trace.write(step=run.step + 1, examples=indices, loss=loss.item(),
                        images=[run.data.entries[i].example.image.name for i in indices])
    return loss


def optimizer_step(run: Run) -> float:
    """Accumulate gradients over the micro-batches, then one optimizer step; returns the
    step's loss (the mean over micro-batches and processes), which the Emo family also
    receives. A stop asked for (signals.py) or a non-finite loss ends the step before the
    update, on every process alike."""
    cfg, accelerator = run.cfg, run.accelerator
    losses = []
    with processes.collectives():  # a process gone: PeerLost
        for micro in range(cfg.grad_accum):
            with ExitStack() as context:
                if micro < cfg.grad_accum - 1:  # gradients are synchronised once, on the last one
                    for model in run.models:
                        context.enter_context(accelerator.no_sync(model))
                context.enter_context(accelerator.autocast())
                if run.dropout is not None:  # masks drawn from run.noise, kept through the backward
                    context.enter_context(run.dropout.micro_batch(run.noise))
                loss = micro_batch_loss(run)
                accelerator.backward(loss / cfg.grad_accum)
            losses.append(loss.detach())
        step_loss, stop = processes.agree(accelerator, torch.stack(losses).mean(),
                                          run.stops.requested is not None or run.lost is not None)
    if run.lost:
        raise run.lost
    if stop:
        raise Interrupted(run.stops.requested or "a stop asked for by another process: a signal, or an input file "
                          "gone there")
    if not math.isfinite(step_loss):
        raise NonFiniteLoss(step_loss)
    norm = accelerator.clip_grad_norm_(list(run.named_params.values()), cfg.max_grad_norm) if cfg.max_grad_norm else None
    run.watch.before_update(run, norm)
    # Through accelerate (and its GradScaler) only a closure reaches the optimizer.
    run.optimizer.step(lambda: step_loss)
    if run.max_norm:
        run.scalars = maxnorm.apply(run.max_norm, cfg.scale_weight_norms)
    if not accelerator.optimizer_step_was_skipped:
        run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update()
    return step_loss


def save(run: Run, history: dict, data_state: dict | None = None, noise_state: torch.Tensor | None = None) -> Path:
    """A checkpoint of the run after ``run.step`` steps (by default: where it is now).
    Every process holds the same LoRA and optimizer state (its own noise stream); the main
    one writes them all. A state holding nan/inf is refused on every process alike. A
    schedule-free optimizer's checkpoint holds its evaluation weights, and its training
    iterate in the optimizer state, exactly."""
    with evaluation_point(run.optimizer.optimizer, keep_train_point=True):
        return _save(run, history, data_state, noise_state)


def _save(run: Run, history: dict, data_state: dict | None, noise_state: torch.Tensor | None) -> Path:
    folder = RunFolder(run.cfg.output)
    with processes.collectives():
        noise_states = processes.gather(run.accelerator, run.noise.get_state() if noise_state is None else noise_state)
    optimizer = run.optimizer.optimizer
    bad = checkpoint.non_finite(run.named_params, optimizer.state_dict())
    if bad:
        found = checkpoint.list_checkpoints(folder.checkpoints)
        raise NonFiniteState(f"the training state holds nan or inf ({bad}) at step {run.step}: not saved; "
                                        + (f"the last good checkpoint is {found[-1]}" if found else
                                           "there is no earlier checkpoint") + "; start again with a lower --lr")
    with processes.collectives():
        run.accelerator.wait_for_everyone()
    if not run.accelerator.is_main_process:
        return folder.checkpoint(run.step)
    return write_checkpoint(run, history, data_state, noise_states)


def write_checkpoint(run: Run, history: dict, data_state: dict | None, noise_states: list) -> Path:
    folder = RunFolder(run.cfg.output)
    try:
        return checkpoint.save_checkpoint(
            folder.checkpoints, step=run.step, named_params=run.named_params, optimizer=run.optimizer.optimizer,
            lr_scheduler=run.lr_scheduler, scaler=run.accelerator.scaler,
            data_state=data_state or run.batches.state_dict(), noise_state=noise_states, config=run.cfg.to_dict(),
            info={"versions": run.info["versions"], "processes": run.accelerator.num_processes, "history": history},
            keep=run.cfg.keep_checkpoints, ema=run.ema.state_dict() if run.ema else None)
    except (OSError, SafetensorError) as exc:  # a full or failing disk: the previous checkpoint is intact
        found = checkpoint.list_checkpoints(folder.checkpoints)
        raise UserError(f"could not write checkpoint {folder.checkpoint(run.step)} ({exc}): free space or fix the "
                        "disk, then --resume " + str(folder.root) + (f" (from {found[-1].name})" if found else "")) \
            from None


def save_or_survive(run: Run, record: RunRecord) -> Path:
    try:
        return save(run, record.history())
    except PeerLost as lost:
        raise survived(run, record, lost, (None, None)) from None


def survived(run: Run, record: RunRecord, lost: PeerLost, start: tuple) -> TrainingStopped:
    """Another process is gone: this one saves its own replica (without the lost noise
    streams) as the checkpoint of the step it was on, unless all saved that step together
    already; then it speaks for the run, and stops."""
    data_state, noise_state = start
    noise_states = [None] * run.accelerator.num_processes
    noise_states[run.accelerator.process_index] = run.noise.get_state() if noise_state is None else noise_state
    done = RunFolder(run.cfg.output).checkpoint(run.step)
    bad = checkpoint.non_finite(run.named_params, run.optimizer.optimizer.state_dict())
    try:
        if done in checkpoint.list_checkpoints(done.parent):
            where = f"checkpoint {done}"
        elif bad:
            where = f"the training state holds nan or inf ({bad}): not saved"
        else:
            where = ("this process saved its replica as checkpoint "
                     f"{write_checkpoint(run, record.history(), data_state, noise_states)}")
    except UserError as exc:
        where = str(exc)
    record.enabled, record.outcome = True, {"checkpoint": where}  # the survivor writes run.json
    stop = TrainingStopped(f"{lost.args[0]} of {run.accelerator.num_processes} is gone (killed or crashed) at step "
                           f"{run.step}; {where}; continue with: accelerate launch ... emotrain sdxl-lora --resume "
                           f"{run.cfg.output}", "stopped-process")
    stop.alone = True  # said by this process, whatever its rank (cli.py)
    return stop


def stopped(run: Run, record: RunRecord, reason: Exception, start: tuple) -> TrainingStopped:
    """Save the state where the interrupted step began, and say how to go on."""
    output = run.cfg.output
    try:
        where = f"checkpoint {save(run, record.history(), *start)}"
    except NonFiniteState as exc:
        where = str(exc)
    record.outcome = {"checkpoint": where}
    if isinstance(reason, Interrupted):
        return TrainingStopped(f"interrupted at step {run.step} ({reason.args[0]}); {where}; continue with: "
                               f"emotrain sdxl-lora --resume {output}", "interrupted")
    if isinstance(reason, InputLost):
        what, *before = reason.args  # a cache file is encoded again on resume; an image must come back first
        stop = TrainingStopped(f"stopped at step {run.step}: {what} (deleted or changed during training); {where}; "
                               + (f"{before[0]}, then continue with: emotrain sdxl-lora --resume {output}" if before
                                  else f"continue with: emotrain sdxl-lora --resume {output} (it encodes what is "
                                       "missing again)"), "stopped-input")
        stop.alone = True  # the process that lost it says so, whatever its rank
        return stop
    return TrainingStopped(f"loss became {reason.args[0]} at step {run.step + 1}: stopped; the last good state is "
                           f"{where} (--resume {output} continues from it; if the run diverged, start again with "
                           "a lower --lr)", "stopped-nan")


def save_lora(run: Run, output: Path) -> dict:
    """The trained LoRA in every registered format, each under the format's file name
    (a schedule-free optimizer's evaluation weights: what validation and samples saw);
    with --ema-decay, its EMA too, under each format's EMA name (``NAME-ema``)."""
    cfg, sdxl = run.cfg, run.sdxl
    text_encoders = [run.accelerator.unwrap_model(te) for te in run.models[1:]] or None
    with evaluation_point(run.optimizer.optimizer):
        weights = lora_weights_from_model(sdxl.unet, text_encoders)
    metadata = {**records.training_metadata(cfg, run.step, run.info["started_at"], sdxl.noise_scheduler.config,
                                            cfg.part_lrs), **run.header, **records.modelspec(cfg, time.time()),
                "ss_epoch": str(run.batches.epoch + 1)}  # the epoch the last step drew from (1-based)
    folder = RunFolder(output)
    files = {name: folder.relative(fmt.write(output / fmt.file_name, weights, metadata, unet_config=sdxl.unet.config))
             for name, fmt in FORMATS.items() if fmt.accepts(weights)}  # no diffusers twin for LoHa/LoKr
    if run.ema is not None:
        with run.ema.swapped_in():
            ema = lora_weights_from_model(sdxl.unet, text_encoders)
        notes = {**metadata, "emotrain_weights": "ema", "emotrain_ema_decay": str(cfg.ema_decay)}
        files.update({f"{name}-ema": folder.relative(fmt.write(output / fmt.ema_file_name, ema, notes,
                                                               unet_config=sdxl.unet.config))
                      for name, fmt in FORMATS.items() if fmt.accepts(ema)})
    return files


def train(cfg: TrainConfig, resume: Path | None = None, planned: dict | None = None) -> dict:
    """The run ``cfg`` describes (from the checkpoint ``resume``); ``planned``: the memory
    plan's part of run.json's ``memory`` (memory.check, made before this loads anything)."""
    folder = RunFolder(cfg.output)
    progress = TrainProgress(cfg.steps, every=cfg.progress_every)
    progress.enabled(processes.is_local_main())  # one process of a multi-GPU run speaks
    with StopRequests() as stops:  # Ctrl-C and SIGTERM: a checkpoint, then a message (signals.py)
        try:
            with processes.collectives():
                run = prepare(cfg, resume, progress, stops)
        except PeerLost as lost:
            raise UserError(f"{lost.args[0]} of {processes.world_size()} is gone (killed or crashed) before training "
                            "began: nothing to save; start the run again") from None
        optimizer = run.optimizer.optimizer
        run.info.update(config=cfg.to_dict(), started_at=time.time())
        main = run.accelerator.is_main_process
        device = run.accelerator.device
        planned = planned if planned is not None else {"planned_peak_bytes": None, "plan": "not made"}
        with run.watch.reporting(run), RunRecord(folder, run.info, main, run.history, run.step,
                                                 memory=lambda: memory.record(planned, device)) as record:
            run.watch.begin(run, resumed=resume is not None)  # logs; step-0 validation and samples
            first_step, started = run.step, time.perf_counter()
            stops.defer()
            with progress:
                while run.step < cfg.steps:
                    # Where this step starts: a stop inside it saves (and resumes from) here.
                    start = run.batches.state_dict(), run.noise.get_state()
                    try:
                        loss = optimizer_step(run)
                    except (Interrupted, NonFiniteLoss, InputLost) as reason:
                        raise stopped(run, record, reason, start) from None
                    except PeerLost as lost:
                        raise survived(run, record, lost, start) from None
                    run.step += 1
                    record.add(loss, optimizer.emotion.s if takes_loss(optimizer) else None)
                    lrs = run.lr_scheduler.get_last_lr()
                    progress.update(run.step, loss, record.emotion[-1], lrs[0] if len(set(lrs)) == 1 else lrs)
                    run.watch.after_step(run, loss)  # logs; validation and samples when due
                    if cfg.save_every and run.step % cfg.save_every == 0 and run.step < cfg.steps:
                        save_or_survive(run, record)

            elapsed = time.perf_counter() - started
            final = save_or_survive(run, record)
            run.trace.params(run.step, run.named_params)
            summary = {"steps": run.step, "steps_this_run": run.step - first_step, "seconds": elapsed,
                       "steps_per_second": (run.step - first_step) / elapsed if elapsed else None,
                       "final_loss": record.losses[-1] if record.losses else None,
                       "should_stop": bool(optimizer.emotion.should_stop) if takes_loss(optimizer) else None,
                       "checkpoint": folder.relative(final), "files": save_lora(run, folder.root) if main else {},
                       "memory": memory.record(planned, device, records.memory_report(
                           device, optimizer, run.named_params.values(), [run.sdxl.unet]))}
            record.write("finished", **summary)
    summary = {**run.info, **summary, "status": "finished", "losses": record.losses,
               "emotion_scalar": record.emotion}
    if main:
        progress.summary(summary, folder.root)
    return summary
