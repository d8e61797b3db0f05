"""Sample images during training, from the live LoRA (no copy of the UNet).

The pipeline is assembled from the very modules being trained: the UNet with its LoRA
and, with ``--train-text-encoders``, the text encoders with theirs. The VAE and frozen
text encoders, which the loop does not need once latents and captions are cached, wait
on the CPU between samples (on the GPU with ``--sample-keep-models``) and are moved to
the device for the sample only. Each image is written as
``samples/step-NNNNNN-KK.png`` with its prompt, seed, step and sampler in the PNG text.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import torch
from PIL.PngImagePlugin import PngInfo

from ..disk.atomic import atomic_path
from ..samplers import V_PRED_GUIDANCE_RESCALE, V_PRED_SETTINGS, sampler
from ..sdxl import CHUNK as CLIP_TOKENS, count_tokens
from ..sources import model_name
from .prompts import SamplePrompt

def v_pred_model(config) -> bool:
    """A v-prediction or zero-terminal-SNR schedule: sampled with trailing timesteps and
    rescaled guidance."""
    return config.prediction_type == "v_prediction" or bool(config.get("rescale_betas_zero_snr"))


def make_scheduler(name: str, config):
    """The sampler's scheduler on the training schedule (its prediction type and zero
    terminal SNR included)."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    chosen = sampler(name)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the training schedule's config has keys a sampler ignores
    try:
        extra = V_PRED_SETTINGS if v_pred_model(config) else {}
        return getattr(diffusers, chosen.scheduler).from_config(config, **chosen.settings, **extra)
    finally:
        diffusers_logging.set_verbosity(level)


def frozen_parts(sdxl, cfg) -> list[torch.nn.Module]:
    """What a sample needs beside the trained models: the VAE and the frozen text encoders."""
    return [sdxl.vae] + ([] if cfg.train_text_encoders else list(sdxl.text_encoders))


def park_frozen(sdxl, cfg, data, sampling: bool) -> None:
    """Once the data is encoded (the validation set too): free the VAE and the frozen
    text encoders the loop does not need, as encoding alone would have; a run that
    samples keeps them, on the CPU unless ``--sample-keep-models``. The loop needs the
    VAE for random crops (``data.vae``) and the encoders for per-draw captions (no
    cached ``data.texts``)."""
    unneeded = ([] if data.vae is not None else [sdxl.vae]) + \
        ([] if cfg.train_text_encoders or not data.texts else list(sdxl.text_encoders))
    for module in unneeded:
        if not sampling:
            module.to("meta")
        elif not cfg.sample_keep_models:
            module.to("cpu")


@contextmanager
def on_device(modules, device):
    homes = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what the sample took goes back to training


def long_prompts(sdxl, prompts: list[SamplePrompt]) -> str | None:
    """The warning for sample prompts the pipeline cuts (CLIP reads 75 tokens; samples do
    not take --max-token-length), or None: said once, in our words, instead of the
    tokenizer's "indexing errors will follow" (which is false: the pipeline truncates)."""
    cut = []
    for k, p in enumerate(prompts, 1):
        for what, text in (("", p.prompt), (" (its negative prompt)", p.negative)):
            n = count_tokens(sdxl.tokenizer, text) if text else 0
            if n > CLIP_TOKENS:
                excerpt = text if len(text) <= 40 else text[:37] + "..."
                cut.append(f"prompt {k}{what} {excerpt!r} ({n} tokens)")
    if not cut:
        return None
    return (f"{len(cut)} sample prompt(s) are longer than {CLIP_TOKENS} tokens and are cut to the first "
            f"{CLIP_TOKENS} in the samples, e.g. {cut[0]}: shorten them")


@contextmanager
def _pipeline_quiet():
    """The pipeline's own words on a long prompt (already said by ``long_prompts``)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def png_info(p: SamplePrompt, step: int, model: str) -> PngInfo:
    """The sample's settings as PNG text: one key each, plus A1111's ``parameters`` line
    that image viewers and web UIs read. ``model``: a name, not a path (samples get shared)."""
    info = PngInfo()
    fields = {"prompt": p.prompt, "negative_prompt": p.negative, "seed": p.seed, "step": step,
              "sampler": p.sampler, "steps": p.steps, "cfg_scale": p.cfg, "width": p.width, "height": p.height,
              "model": model}
    for key, value in fields.items():
        info.add_text(key, str(value))
    negative = f"\nNegative prompt: {p.negative}" if p.negative else ""
    info.add_text("parameters", f"{p.prompt}{negative}\nSteps: {p.steps}, Sampler: {sampler(p.sampler).label}, "
                                f"CFG scale: {p.cfg:g}, Seed: {p.seed}, Size: {p.width}x{p.height}, "
                                f"Training step: {step}")
    info.add_text("emotrain_sample", json.dumps({**p.to_dict(), "step": step}))
    return info


def generate(run, prompts: list[SamplePrompt], step: int, folder) -> list:
    """Every prompt once, with the LoRA as it is after ``step`` steps -> [(path, image)]."""
    from diffusers import StableDiffusionXLPipeline

    cfg, sdxl, accelerator = run.cfg, run.sdxl, run.accelerator
    device = accelerator.device
    unet = accelerator.unwrap_model(run.models[0])
    encoders = [accelerator.unwrap_model(m) for m in run.models[1:3]] or list(sdxl.text_encoders)
    schedulers = {}
    rescale = V_PRED_GUIDANCE_RESCALE if v_pred_model(sdxl.noise_scheduler.config) else 0.0
    out = []
    with on_device(frozen_parts(sdxl, cfg), device):
        pipe = StableDiffusionXLPipeline(vae=sdxl.vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=sdxl.tokenizer, tokenizer_2=sdxl.tokenizer_2, unet=unet,
                                         scheduler=make_scheduler(cfg.sample_sampler, sdxl.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        for k, p in enumerate(prompts):
            if p.sampler not in schedulers:
                schedulers[p.sampler] = make_scheduler(p.sampler, sdxl.noise_scheduler.config)
            pipe.scheduler = schedulers[p.sampler]
            generator = torch.Generator().manual_seed(p.seed)  # on the CPU: the same picture on any device
            with accelerator.autocast(), _pipeline_quiet():
                image = pipe(prompt=p.prompt, negative_prompt=p.negative or None, width=p.width, height=p.height,
                             num_inference_steps=p.steps, guidance_scale=p.cfg, guidance_rescale=rescale,
                             generator=generator).images[0]
            path = folder.sample(step, k)
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG", pnginfo=png_info(p, step, model_name(cfg.model)))
            out.append((path, image))
    return out
