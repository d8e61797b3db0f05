"""SDXL's conditioning, as in Stability's and diffusers' training: micro-conditioning on
original size / crop / target size, VAE latents times the VAE's scaling factor, and the
UNet's call with its added conditions (the text conditioning is in prompts.py; the loss
built on the prediction is emotrain/loss.py)."""

from __future__ import annotations

import torch


def time_ids(original_size, crop_top_left, target_size) -> torch.Tensor:
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    pixels = pixels.to(vae.device, vae.dtype)
    latents = vae.encode(pixels).latent_dist.sample(generator=generator)
    return latents.float() * vae.config.scaling_factor


def predict(unet, noisy, timesteps, prompt_embeds, pooled, add_time_ids, dtype=None) -> torch.Tensor:
    """The UNet's prediction for noisy latents, conditioned as SDXL is (text embeddings,
    pooled embedding and micro-conditioning), computed in ``dtype`` (default the UNet's)."""
    dtype = dtype or unet.dtype  # a DistributedDataParallel wrapper has none: the caller says
    return unet(noisy.to(dtype), timesteps, prompt_embeds.to(dtype),
                added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": add_time_ids.to(dtype)}).sample
