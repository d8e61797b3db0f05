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
    cfg = TrainConfig(model="tiny", min_snr_gamma=5.0, noise_offset=0.05, batch_size=n, val_timesteps=n,
                      loss_type="huber", debiased_estimation=True, min_timestep=100, max_timestep=900,
                      multires_noise_iterations=3, noise_offset_random_strength=True)
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


# -- loss and noise options (sd-scripts' definitions), against values worked out by hand --

def _schedule(prediction="epsilon"):
    """alpha-bar 1, 0.5, 0.2, 0: SNR inf, 1, 0.25, 0; sigma 0, 1, 2, inf."""
    return SimpleNamespace(alphas_cumprod=torch.tensor([1.0, 0.5, 0.2, 0.0]),
                           config=SimpleNamespace(num_train_timesteps=4, prediction_type=prediction))


@pytest.mark.parametrize("loss_type,expected", [
    ("l2", [0.0, 1.0, 4.0]), ("l1", [0.0, 1.0, 2.0]),
    ("huber", [0.0, 0.6180340, 1.5615528]),  # 2c(sqrt(d^2 + c^2) - c), c = 0.5: sqrt(1.25) - .5, sqrt(4.25) - .5
    ("smooth_l1", [0.0, 1.2360680, 3.1231056])])
def test_loss_types(loss_type, expected):
    objective = Objective(loss_type=loss_type, huber_c=0.5, huber_schedule="constant")
    pred, target = torch.tensor([1.0, 2.0, -1.0]).view(3, 1, 1, 1), torch.tensor([1.0, 1.0, 1.0]).view(3, 1, 1, 1)
    out = objective.elementwise(pred, target, _schedule(), torch.tensor([1, 1, 1]))
    assert out.flatten().tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [0.1, 0.1, 0.1, 0.1]),
    ("exponential", [1.0, 0.1 ** 0.25, 0.1 ** 0.5, 0.1 ** 0.75]),  # c^(t/T), T = 4
    ("snr", [1.0, 0.9 / 4 + 0.1, 0.9 / 9 + 0.1, 0.1])])  # (1 - c)/(1 + sigma)^2 + c
def test_huber_schedules(schedule, expected):
    c = Objective(loss_type="huber", huber_c=0.1, huber_schedule=schedule).huber_threshold(
        _schedule(), torch.tensor([0, 1, 2, 3]))
    assert c.tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("prediction,expected", [
    ("epsilon", [1000 ** -0.5, 1.0, 2.0]),  # 1/sqrt(SNR), SNR capped at 1000
    ("v_prediction", [1 / 1001, 0.5, 0.8])])  # 1/(SNR + 1)
def test_debiased_estimation_weight(prediction, expected):
    from emotrain.loss import debiased_weight
    assert debiased_weight(_schedule(prediction), torch.tensor([0, 1, 2])).tolist() == pytest.approx(expected, rel=1e-6)


def _draws(seed, *shapes_and_kinds):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) if k == "n" else torch.rand(s, generator=g) if k == "u"
            else torch.randint(k[0], k[1], s, generator=g) for s, k in shapes_and_kinds]


def test_noise_draws_in_their_order():
    """The noise, the offset (random strength), the pyramid, the timesteps in [min, max),
    then the input perturbation: one generator, one order (resume replays it)."""
    latents, scheduler = torch.zeros(2, 4, 8, 8), _schedule()
    scheduler.config.num_train_timesteps = 1000
    noise, timesteps = Objective().draw(latents, scheduler, torch.Generator().manual_seed(1))
    n, t = _draws(1, ((2, 4, 8, 8), "n"), ((2,), (0, 1000)))  # the defaults draw what they always drew
    assert torch.equal(noise, n) and torch.equal(timesteps, t)

    objective = Objective(noise_offset=0.1, noise_offset_random_strength=True, min_timestep=3, max_timestep=5,
                          ip_noise_gamma=0.2)
    g = torch.Generator().manual_seed(1)
    noise, timesteps = objective.draw(latents, scheduler, g)
    perturbation = objective.perturbation(latents, g)
    n, u, offset, t, p = _draws(1, ((2, 4, 8, 8), "n"), ((1,), "u"), ((2, 4, 1, 1), "n"), ((2,), (3, 5)),
                                ((2, 4, 8, 8), "n"))
    assert torch.allclose(noise, n + 0.1 * u * offset) and torch.equal(timesteps, t)
    assert set(timesteps.tolist()) <= {3, 4} and torch.allclose(perturbation, 0.2 * p)


def test_multires_noise_is_sd_scripts_pyramid():
    latents = torch.zeros(2, 4, 8, 8)
    scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    noise, _ = Objective(multires_noise_iterations=2, multires_noise_discount=0.5).draw(
        latents, scheduler, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    n0 = torch.randn(2, 4, 8, 8, generator=g)
    r0 = float(torch.rand((), generator=g)) * 2 + 2  # level 0: r^0 = 1, full size, weight 1
    n1 = torch.randn(2, 4, 8, 8, generator=g)
    r1 = float(torch.rand((), generator=g)) * 2 + 2  # level 1: 8 / r, in 2..4, weight 0.5
    side = int(8 / r1)
    n2 = torch.randn(2, 4, side, side, generator=g)
    up = torch.nn.Upsample(size=(8, 8), mode="bilinear")(n2)
    total = n0 + n1 + 0.5 * up
    assert 2 <= side <= 4 and r0 >= 2
    assert torch.allclose(noise, total / total.std(), atol=1e-6)


def test_ip_noise_gamma_perturbs_the_input_not_the_target():
    """With a UNet that returns its input, the epsilon l2 loss is
    mean((sqrt(ab) x0 + sqrt(1 - ab)(n + p) - n)^2)."""
    from diffusers import DDPMScheduler

    class Echo(torch.nn.Module):
        def forward(self, sample, *args, **kwargs):
            return SimpleNamespace(sample=sample)

    scheduler = DDPMScheduler()
    g = torch.Generator().manual_seed(3)
    x0, n, p = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([500])
    objective = Objective(ip_noise_gamma=0.1, dtype=torch.float32)
    got = objective.per_sample(Echo(), scheduler, x0, n, t, torch.zeros(1, 77, 64), torch.zeros(1, 32),
                               torch.zeros(1, 6), perturbation=p)
    ab = scheduler.alphas_cumprod[500]
    expected = ((ab.sqrt() * x0 + (1 - ab).sqrt() * (n + p) - n) ** 2).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = objective.per_sample(Echo(), scheduler, x0, n, t, torch.zeros(1, 77, 64), torch.zeros(1, 32),
                                 torch.zeros(1, 6))
    assert plain.item() != pytest.approx(got.item(), rel=1e-3)


def test_validation_timesteps_spread_over_the_training_range():
    from emotrain.watch.validation import stratified_timesteps

    t = stratified_timesteps(4, 900, torch.Generator().manual_seed(0), start=100)
    slices = [(100, 300), (300, 500), (500, 700), (700, 900)]
    assert all(lo <= int(x) < hi for x, (lo, hi) in zip(t, slices)), t
