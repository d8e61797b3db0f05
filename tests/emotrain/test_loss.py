"""The one training objective (emotrain/loss.py): training and validation compute the
same loss, so a validation curve measures what training minimizes."""

from types import SimpleNamespace

import pytest
import torch

from emotrain.config import TrainConfig
from emotrain.lora.inject import add_lora, unet_lora_config
from emotrain.loss import Objective
from emotrain.sdxl import load_sdxl
from emotrain.watch.validation import Validation, ValidationItem


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_validation_loss_at_the_training_noise_equals_the_training_loss(tiny_path, prediction):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    sdxl = load_sdxl(str(tiny_path))
    sdxl.noise_scheduler.register_to_config(prediction_type=prediction)
    add_lora(sdxl.unet, unet_lora_config(4, 4, conv_rank=2, conv_alpha=2))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a LoRA that changes the output (a fresh one starts at zero)
        for name, p in sdxl.unet.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    n = 3
    cfg = TrainConfig(model="tiny", min_snr_gamma=5.0, noise_offset=0.05, batch_size=n, val_timesteps=n)
    objective = Objective.of(cfg)
    latent, embeds, pooled = torch.randn(4, 8, 8, generator=g), torch.randn(77, 64, generator=g), \
        torch.randn(32, generator=g)
    time_ids = torch.tensor([64.0, 64, 0, 0, 64, 64])
    mask = torch.ones(1, 8, 8)
    mask[:, :, 4:] = 0.25
    batch = [x[None].expand(n, *x.shape) for x in (latent, embeds, pooled, time_ids, mask)]

    with torch.no_grad():
        trained = objective.loss(sdxl.unet, sdxl.noise_scheduler, *batch[:4], torch.Generator().manual_seed(9),
                                 weight=batch[4])
    noise, timesteps = objective.draw(batch[0], sdxl.noise_scheduler, torch.Generator().manual_seed(9))

    validation = Validation.__new__(Validation)  # its set-up encodes images; here the items are given
    validation.cfg, validation.objective = cfg, objective
    validation.items = [ValidationItem(latent, time_ids, "a caption", mask, embeds, pooled)]
    validation.noise, validation.timesteps = [noise], [timesteps]
    AcceleratorState._reset_state()
    run = SimpleNamespace(accelerator=Accelerator(cpu=True), models=[sdxl.unet], sdxl=sdxl)
    assert validation.loss(run) == pytest.approx(trained.item(), rel=1e-6)
    assert trained.item() > 0


def test_the_v_prediction_target_and_zero_terminal_snr_schedule():
    """tiny-vpred trains v = sqrt(ab) * noise - sqrt(1 - ab) * x0, on a schedule whose
    last alpha-bar is 0 (there the target is -x0)."""
    from emotrain.loss import target
    from emotrain.sdxl import model_schedule, tiny_sdxl_path
    from diffusers import DDPMScheduler

    schedule = model_schedule(str(tiny_sdxl_path(vpred=True)))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=schedule.prediction_type,
                              rescale_betas_zero_snr=schedule.zero_terminal_snr)
    assert scheduler.alphas_cumprod[-1] == 0 and scheduler.alphas_cumprod[-2] > 0
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ab = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(target(scheduler, x0, noise, t), ab.sqrt() * noise - (1 - ab).sqrt() * x0, atol=1e-6)
    assert torch.allclose(target(scheduler, x0, noise, t)[2], -x0[2])


def test_scale_v_pred_loss_like_noise_pred_is_snr_over_snr_plus_one():
    from diffusers import DDPMScheduler

    from emotrain.loss import v_pred_scale

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", rescale_betas_zero_snr=True)
    t = torch.tensor([0, 999])
    ab0 = float(scheduler.alphas_cumprod[0])
    snr0 = min(ab0 / (1 - ab0), 1000.0)  # 1/0.00085 - 1 = 1175.5: capped at 1000
    assert v_pred_scale(scheduler, t).tolist() == pytest.approx([snr0 / (snr0 + 1), 0.0], rel=1e-5)
    assert snr0 == 1000.0
