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
