"""The training objective, in one place: the training loop, validation and
``vram --measure`` all compute their loss here, so the validation loss cannot drift from
the training loss.

- The draws: one noise tensor per latent (plus the noise offset, a per-channel constant)
  and one timestep per sample, from the run's generator on the CPU, so a run is
  reproducible on any device and resumable exactly. Validation fixes them once instead.
- The target: what the scheduler's prediction type asks for (epsilon: the noise;
  v-prediction: the velocity).
- The weighting: ``weight`` multiplies the squared error per latent pixel ([B, 1, h, w]:
  a loss mask) or per sample ([B, 1, 1, 1]: the prior-loss weight of regularization
  images), as sd-scripts does (a pixel of weight 0 gives no gradient); then min-SNR-gamma
  per timestep, in its epsilon or v-prediction form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError
from .precision import to_device, weight_dtype
from .sdxl import predict


@dataclass(frozen=True)
class Objective:
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    dtype: torch.dtype | None = None  # the UNet's compute dtype (None: the UNet's own)

    @classmethod
    def of(cls, cfg) -> "Objective":
        """The objective a training config describes."""
        return cls(cfg.noise_offset, cfg.min_snr_gamma, weight_dtype(cfg.mixed_precision))

    def draw(self, latents: torch.Tensor, scheduler, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (noise, timesteps) for ``latents``, drawn from ``generator`` in a fixed order."""
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator)
        if self.noise_offset:
            noise += self.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
        return noise, timesteps

    def per_sample(self, unet, scheduler, latents, noise, timesteps, prompt_embeds, pooled, time_ids,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted loss of each sample at the given noise and timesteps."""
        noise, timesteps = to_device(noise, latents.device), to_device(timesteps, latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = predict(unet, noisy, timesteps, prompt_embeds, pooled, time_ids, self.dtype)
        error = F.mse_loss(pred.float(), target(scheduler, latents, noise, timesteps).float(), reduction="none")
        if weight is not None:
            error = error * weight.to(error.device, error.dtype)
        per_sample = error.mean(dim=(1, 2, 3))
        if self.min_snr_gamma:
            per_sample = per_sample * min_snr_weight(scheduler, timesteps, self.min_snr_gamma)
        return per_sample

    def loss(self, unet, scheduler, latents, prompt_embeds, pooled, time_ids, generator: torch.Generator,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        """One training loss: fresh draws from ``generator``, the mean over the batch."""
        noise, timesteps = self.draw(latents, scheduler, generator)
        return self.per_sample(unet, scheduler, latents, noise, timesteps, prompt_embeds, pooled, time_ids,
                               weight).mean()


def target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"the model's scheduler predicts {kind!r}, which LoRA training does not support: "
                    "use an epsilon or v-prediction SDXL model")


def min_snr_weight(scheduler, timesteps, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon; min(SNR, gamma) / (SNR + 1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    return torch.clamp(snr, max=gamma) / (snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr)
