"""The training objective, in one place: the training loop, validation and
``vram --measure`` all compute their loss here, so the validation loss cannot drift from
the training loss.

- The draws: one noise tensor per latent (plus the noise offset, a per-channel constant,
  and multi-resolution noise), one timestep per sample in [min, max), and the input
  perturbation (noise in the UNet's input, not in the target), all from the run's
  generator on the CPU, so a run is reproducible on any device and resumable exactly.
  Validation fixes plain noise and spread timesteps once instead.
- The target: what the scheduler's prediction type asks for (epsilon: the noise;
  v-prediction: the velocity).
- The per-element loss: l2, l1, huber or smooth_l1 (sd-scripts' definitions).
- The weighting: ``weight`` multiplies the per-element loss per latent pixel ([B, 1, h, w]:
  a loss mask) or per sample ([B, 1, 1, 1]: the prior-loss weight of regularization
  images), as sd-scripts does (a pixel of weight 0 gives no gradient); then min-SNR-gamma
  per timestep, in its epsilon or v-prediction form; with v-prediction, optionally
  SNR/(SNR+1) (``--scale-v-pred-loss-like-noise-pred``); the debiased estimation weight
  (sd-scripts' definitions).
- The schedule (prediction type, zero terminal SNR) is the scheduler's: sdxl.load_sdxl
  builds it from the model and the flags.
"""

from __future__ import annotations

import dataclasses
import math
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
    scale_v_pred: bool = False
    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    debiased_estimation: bool = False
    min_timestep: int = 0
    max_timestep: int | None = None  # None: the schedule's end
    ip_noise_gamma: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    noise_offset_random_strength: bool = False

    @classmethod
    def of(cls, cfg) -> "Objective":
        """The objective a training config describes."""
        return cls(cfg.noise_offset, cfg.min_snr_gamma, weight_dtype(cfg.mixed_precision),
                   cfg.scale_v_pred_loss_like_noise_pred, cfg.loss_type, cfg.huber_c, cfg.huber_schedule,
                   cfg.debiased_estimation, cfg.min_timestep, cfg.max_timestep, cfg.ip_noise_gamma,
                   cfg.multires_noise_iterations, cfg.multires_noise_discount, cfg.noise_offset_random_strength)

    def timestep_range(self, scheduler) -> tuple[int, int]:
        """[min, max) of the training timesteps."""
        return self.min_timestep, self.max_timestep or scheduler.config.num_train_timesteps

    def draw(self, latents: torch.Tensor, scheduler, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (noise, timesteps) for ``latents``, drawn from ``generator`` in a fixed order
        (sd-scripts' definitions): the noise, its offset (a per-channel constant, of a
        strength drawn in [0, offset) with ``noise_offset_random_strength``), the pyramid
        (multi-resolution) noise, the timesteps in [min_timestep, max_timestep)."""
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator)
        if self.noise_offset:
            strength = self.noise_offset * torch.rand(1, generator=generator) if self.noise_offset_random_strength \
                else self.noise_offset
            noise += strength * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
        if self.multires_noise_iterations:
            noise = pyramid_noise(noise, self.multires_noise_iterations, self.multires_noise_discount, generator)
        timesteps = torch.randint(*self.timestep_range(scheduler), (b,), generator=generator)
        return noise, timesteps

    def perturbation(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """Input perturbation (``ip_noise_gamma``): extra noise in the UNet's input only,
        not in the target, drawn after ``draw``."""
        if not self.ip_noise_gamma:
            return None
        return self.ip_noise_gamma * torch.randn(latents.shape, generator=generator)

    def per_sample(self, unet, scheduler, latents, noise, timesteps, prompt_embeds, pooled, time_ids,
                   weight: torch.Tensor | None = None, perturbation: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted loss of each sample at the given noise and timesteps."""
        noise, timesteps = to_device(noise, latents.device), to_device(timesteps, latents.device)
        model_noise = noise if perturbation is None else noise + to_device(perturbation, noise.device)
        noisy = scheduler.add_noise(latents, model_noise, timesteps)
        pred = predict(unet, noisy, timesteps, prompt_embeds, pooled, time_ids, self.dtype)
        error = self.elementwise(pred.float(), target(scheduler, latents, noise, timesteps).float(), scheduler,
                                 timesteps)
        if weight is not None:
            error = error * weight.to(error.device, error.dtype)
        per_sample = error.mean(dim=(1, 2, 3))
        if self.min_snr_gamma:
            per_sample = per_sample * min_snr_weight(scheduler, timesteps, self.min_snr_gamma)
        if self.scale_v_pred and scheduler.config.prediction_type == "v_prediction":
            per_sample = per_sample * v_pred_scale(scheduler, timesteps)
        if self.debiased_estimation:
            per_sample = per_sample * debiased_weight(scheduler, timesteps)
        return per_sample

    def elementwise(self, pred, target_, scheduler, timesteps) -> torch.Tensor:
        """sd-scripts' conditional_loss, unreduced: l2, l1, or with d = pred - target and
        c per sample, huber 2c(sqrt(d^2 + c^2) - c) and smooth_l1 2(sqrt(d^2 + c^2) - c)."""
        if self.loss_type == "l2":
            return F.mse_loss(pred, target_, reduction="none")
        if self.loss_type == "l1":
            return F.l1_loss(pred, target_, reduction="none")
        c = self.huber_threshold(scheduler, timesteps).view(-1, 1, 1, 1)
        smooth = torch.sqrt((pred - target_) ** 2 + c ** 2) - c
        return 2 * (c if self.loss_type == "huber" else 1) * smooth

    def huber_threshold(self, scheduler, timesteps) -> torch.Tensor:
        """sd-scripts' huber_c per timestep: constant c; exponential c^(t/T); snr
        (1 - c) / (1 + sigma_t)^2 + c with sigma_t = sqrt((1 - ab_t) / ab_t)."""
        t = timesteps.float()
        if self.huber_schedule == "constant":
            return torch.full_like(t, self.huber_c)
        if self.huber_schedule == "exponential":
            alpha = -math.log(self.huber_c) / scheduler.config.num_train_timesteps
            return torch.exp(-alpha * t)
        ab = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigmas = ((1.0 - ab) / ab) ** 0.5
        return (1 - self.huber_c) / (1 + sigmas) ** 2 + self.huber_c

    def loss(self, unet, scheduler, latents, prompt_embeds, pooled, time_ids, generator: torch.Generator,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        """One training loss: fresh draws from ``generator``, the mean over the batch."""
        noise, timesteps = self.draw(latents, scheduler, generator)
        perturbation = self.perturbation(latents, generator)
        return self.per_sample(unet, scheduler, latents, noise, timesteps, prompt_embeds, pooled, time_ids,
                               weight, perturbation).mean()

    def describe(self) -> dict:
        """The settings that define the loss value (run.json, validation's description)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "dtype"}


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """sd-scripts' pyramid_noise_like (multi-resolution noise): for i < iterations, noise
    of size (h, w) / r^i with r drawn in [2, 4), scaled up bilinearly and added at weight
    discount^i, stopping once a side is 1; the sum divided by its standard deviation."""
    b, c, h, w = noise.shape
    noise = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        low = torch.randn((b, c, hn, wn), generator=generator)
        noise += F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def check_schedule(cfg, schedule) -> None:
    """What the objective needs of the model's schedule (sdxl.Schedule), before the
    weights load."""
    if cfg.scale_v_pred_loss_like_noise_pred and not schedule.v_prediction:
        raise UserError("scale_v_pred_loss_like_noise_pred: the model is epsilon-prediction: add "
                        "--v-parameterization if it is a v-prediction model, else drop the flag")


def target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"the model's scheduler predicts {kind!r}, which LoRA training does not support: "
                    "use an epsilon or v-prediction SDXL model")


def snr(scheduler, timesteps) -> torch.Tensor:
    """alpha-bar / (1 - alpha-bar) at each timestep (diffusers' compute_snr); 0 at the
    last timestep of a zero-terminal-SNR schedule."""
    from diffusers.training_utils import compute_snr

    return compute_snr(scheduler, timesteps)


def min_snr_weight(scheduler, timesteps, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon; min(SNR, gamma) / (SNR + 1) for v-prediction."""
    s = snr(scheduler, timesteps)
    return torch.clamp(s, max=gamma) / (s + 1 if scheduler.config.prediction_type == "v_prediction" else s)


def debiased_weight(scheduler, timesteps) -> torch.Tensor:
    """sd-scripts' apply_debiased_estimation: 1 / sqrt(SNR) for epsilon, 1 / (SNR + 1)
    for v-prediction, the SNR capped at 1000."""
    s = torch.clamp(snr(scheduler, timesteps), max=1000)
    return 1 / (s + 1) if scheduler.config.prediction_type == "v_prediction" else 1 / torch.sqrt(s)


def v_pred_scale(scheduler, timesteps) -> torch.Tensor:
    """sd-scripts' scale_v_prediction_loss_like_noise_prediction: SNR / (SNR + 1), the
    SNR capped at 1000 (it is infinite where alpha-bar is 1)."""
    s = torch.clamp(snr(scheduler, timesteps), max=1000)
    return s / (s + 1)
