"""SDXL conditioning and the denoising loss against hand-computed expectations."""

from __future__ import annotations

import types

import pytest
import torch
from diffusers import DDPMScheduler

from emotrain.loss import Objective
from emotrain.sdxl import encode_images, encode_prompts, load_config, load_sdxl, time_ids


def _layers(encoder):
    # transformers 5 flattens CLIPTextModel (no text_model level); 4 nests it
    return encoder.get_submodule("text_model.encoder.layers" if hasattr(encoder, "text_model") else "encoder.layers")


@pytest.fixture(scope="module")
def tiny():
    return load_sdxl("tiny")


def test_prompts_use_both_penultimate_states_and_the_second_pooled(tiny):
    embeds, pooled = encode_prompts(tiny, ["a red circle", "a blue square"], "cpu")
    w1, w2 = tiny.text_encoder.config.hidden_size, tiny.text_encoder_2.config.hidden_size
    assert embeds.shape == (2, 77, w1 + w2) and pooled.shape == (2, tiny.text_encoder_2.config.projection_dim)
    # The last transformer layer of either encoder does not reach the embeddings (they are
    # the penultimate hidden states), but the second encoder's last layer reaches pooled.
    with torch.no_grad():
        for encoder in tiny.text_encoders:
            for p in _layers(encoder)[-1].parameters():
                p.add_(torch.randn_like(p))
    embeds2, pooled2 = encode_prompts(tiny, ["a red circle", "a blue square"], "cpu")
    assert torch.equal(embeds, embeds2)
    assert not torch.allclose(pooled, pooled2)
    # te1 fills the first channels, te2 the rest: changing te2 leaves the first part.
    with torch.no_grad():
        for p in _layers(tiny.text_encoder_2)[0].parameters():
            p.add_(torch.randn_like(p))
    embeds3, _ = encode_prompts(tiny, ["a red circle", "a blue square"], "cpu")
    assert torch.equal(embeds3[..., :w1], embeds[..., :w1]) and not torch.allclose(embeds3[..., w1:], embeds[..., w1:])


def test_time_ids_follow_sdxl_order():
    assert time_ids((768, 1024), (16, 0), (704, 1024)).tolist() == [768, 1024, 16, 0, 704, 1024]


def test_latents_are_vae_samples_times_the_scaling_factor(tiny):
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    got = encode_images(tiny.vae, pixels, torch.Generator().manual_seed(5))
    dist = tiny.vae.encode(pixels).latent_dist
    want = dist.sample(generator=torch.Generator().manual_seed(5)) * 0.13025
    assert got.shape == (1, 4, 8, 8) and torch.allclose(got, want)


class ZeroUNet(torch.nn.Module):
    """Predicts 0 everywhere: the loss is then the mean square of the target."""
    dtype = torch.float32

    def forward(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs):
        self.seen = (timesteps, encoder_hidden_states, added_cond_kwargs)
        return types.SimpleNamespace(sample=torch.zeros_like(sample))


def _draws(seed, shape):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g)
    return noise, torch.randint(0, 1000, (shape[0],), generator=g)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_the_training_loss_by_hand(prediction, gamma):
    scheduler = DDPMScheduler.from_config({**load_config("sdxl_scheduler"), "prediction_type": prediction})
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    unet = ZeroUNet()
    loss = Objective(min_snr_gamma=gamma).loss(unet, scheduler, latents, torch.zeros(3, 77, 64), torch.zeros(3, 32),
                                               torch.zeros(3, 6), torch.Generator().manual_seed(9))
    noise, t = _draws(9, latents.shape)
    assert torch.equal(unet.seen[0], t)
    # scaled-linear betas from the config, by hand
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    target = noise if prediction == "epsilon" else (alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents)
    per_sample = (target.double() ** 2).mean(dim=(1, 2, 3))
    if gamma:
        snr = (alpha_bar / (1 - alpha_bar)).flatten()
        per_sample = per_sample * torch.clamp(snr, max=gamma) / (snr + 1 if prediction == "v_prediction" else snr)
    assert loss.item() == pytest.approx(per_sample.mean().item(), rel=1e-5)


def test_noise_offset_adds_one_value_per_channel():
    scheduler = DDPMScheduler.from_config(load_config("sdxl_scheduler"))
    latents = torch.zeros(2, 4, 8, 8)
    loss = Objective(noise_offset=0.1).loss(ZeroUNet(), scheduler, latents, torch.zeros(2, 77, 64), torch.zeros(2, 32),
                                            torch.zeros(2, 6), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    noise += 0.1 * torch.randn((2, 4, 1, 1), generator=g)
    assert loss.item() == pytest.approx((noise ** 2).mean().item(), rel=1e-5)
