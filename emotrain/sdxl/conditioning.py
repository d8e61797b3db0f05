"""SDXL's conditioning and the denoising loss, as in Stability's and diffusers' training:
micro-conditioning on original size / crop / target size, VAE latents times the VAE's
scaling factor, and the target the scheduler's prediction type asks for (the text
conditioning is in prompts.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from ..errors import UserError


def time_ids(original_size, crop_top_left, target_size) -> torch.Tensor:
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    pixels = pixels.to(vae.device, vae.dtype)
    latents = vae.encode(pixels).latent_dist.sample(generator=generator)
    return latents.float() * vae.config.scaling_factor


def denoising_loss(unet, scheduler, latents, prompt_embeds, pooled, add_time_ids, generator: torch.Generator,
                   noise_offset: float = 0.0, min_snr_gamma: float | None = None,
                   weight: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
    """One noisy sample per latent at a random timestep; the mean MSE to the scheduler's
    target, weighted by min-SNR-gamma when asked. Random numbers come from ``generator``
    on the CPU, so a run is reproducible on any device and resumable exactly.
    ``weight`` multiplies the squared error per latent pixel ([B, 1, h, w]: a loss mask)
    or per sample ([B, 1, 1, 1]: the prior-loss weight of regularization images), as
    sd-scripts does: a pixel of weight 0 gives no gradient."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise += noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    return noised_loss(unet, scheduler, latents, noise, timesteps, prompt_embeds, pooled, add_time_ids,
                       min_snr_gamma, weight, dtype).mean()


def noised_loss(unet, scheduler, latents, noise, timesteps, prompt_embeds, pooled, add_time_ids,
                min_snr_gamma: float | None = None, weight: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
    """The loss of each sample at the given noise and timesteps (training draws them;
    validation fixes them once), weighted as training weights it."""
    noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UserError(f"the model's scheduler predicts {kind!r}, which LoRA training does not support: "
                        "use an epsilon or v-prediction SDXL model")
    dtype = dtype or unet.dtype  # a DistributedDataParallel wrapper has none: the caller says
    pred = unet(noisy.to(dtype), timesteps, prompt_embeds.to(dtype),
                added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": add_time_ids.to(dtype)}).sample
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    if weight is not None:
        error = error * weight.to(error.device, error.dtype)
    per_sample = error.mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = compute_snr(scheduler, timesteps)
        weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if kind == "v_prediction" else snr)
        per_sample = per_sample * weight
    return per_sample
