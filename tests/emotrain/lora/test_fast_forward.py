"""The ``lora`` kind's fused forward (emotrain/lora/fast.py) against peft's own: the same
numbers in fp32 bit for bit, within bf16 rounding under autocast (measured against an
fp32 reference, as close as peft's), the same with gradient checkpointing, fewer ops."""

import collections

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode

from emotrain.lora import fast
from emotrain.lora.inject import add_lora, lora_module_names, unet_lora_config
from emotrain.loss import Objective
from emotrain.sdxl.tiny import TINY_UNET

BF16 = torch.bfloat16


def unet(use_fast: bool, dtype=torch.float32, checkpointing: bool = False):
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(TINY_UNET).to(dtype)
    add_lora(model, unet_lora_config(4, 2, 2, 1, "full"), fast=use_fast)
    with torch.no_grad():  # a trained-looking B, so every factor gets a gradient
        generator = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def loss_and_grads(model, dtype, autocast: bool):
    g = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    pooled, time_ids = torch.randn(2, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        loss = Objective(min_snr_gamma=5.0, dtype=dtype).loss(model, DDPMScheduler(num_train_timesteps=1000), latents,
                                                              embeds, pooled, time_ids, torch.Generator().manual_seed(3))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def flat(grads):
    return torch.cat([grads[n].flatten() for n in sorted(grads)])


def test_installed_on_every_lora_layer():
    model = unet(True)
    layers = [m for m in model.modules() if isinstance(m, fast._Fast)]
    assert len(layers) == len(lora_module_names(model)) > 0
    assert not any(isinstance(m, fast._Fast) for m in unet(False).modules())


def test_fp32_is_peft_bit_for_bit():
    (l0, g0), (l1, g1) = (loss_and_grads(unet(f), torch.float32, False) for f in (False, True))
    assert torch.equal(l0, l1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


def test_bf16_autocast_within_bf16_rounding_of_peft():
    ref_loss, ref = loss_and_grads(unet(False), torch.float32, False)
    (pl, pg), (fl, fg) = (loss_and_grads(unet(f, BF16), BF16, True) for f in (False, True))
    assert all(g.dtype == torch.float32 for g in fg.values())  # fp32 gradients of the fp32 factors
    assert abs(fl - pl) <= 2 * 2**-8 * abs(pl)  # the losses agree to bf16 rounding
    peft_error = (flat(pg) - flat(ref)).norm() / flat(ref).norm()
    fast_error = (flat(fg) - flat(ref)).norm() / flat(ref).norm()
    assert fast_error <= 1.5 * peft_error + 1e-3, (fast_error, peft_error)
    assert peft_error > 0  # bf16 really ran


def test_checkpointing_recomputes_the_same():
    (l0, g0), (l1, g1) = (loss_and_grads(unet(True, BF16, ckpt), BF16, True) for ckpt in (False, True))
    assert torch.equal(l0, l1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fewer_ops_and_casts(checkpointing):
    counts = {}
    for f in (False, True):
        model = unet(f, BF16, checkpointing)
        with Ops() as ops:
            loss_and_grads(model, BF16, True)
        counts[f] = ops.ops
    assert counts[True]["_to_copy"] < 0.6 * counts[False]["_to_copy"]
    assert counts[True]["mul"] * 2 < counts[False]["mul"]
    assert sum(counts[True].values()) < 0.75 * sum(counts[False].values())


def test_one_refresh_of_the_copies_per_change_of_the_factors():
    """The factors' low-precision copies are made for all layers at once (one foreach copy,
    one foreach multiply for the scales), only when a factor changed; a model whose
    factors were changed (in place, or by replacing a tensor) computes what a model built
    with those factors computes, bit for bit."""
    model = unet(True, BF16, True)
    with Ops() as first:
        loss_and_grads(model, BF16, True)
    with Ops() as again:  # nothing changed: no copy at all
        model.zero_grad(set_to_none=True)
        loss_and_grads(model, BF16, True)
    assert (first.ops["_foreach_copy_"], first.ops["_foreach_mul_"]) == (1, 1)
    assert again.ops["_foreach_copy_"] == again.ops["_foreach_mul_"] == 0
    layers = sum(1 for m in model.modules() if isinstance(m, fast._Fast))
    assert first.ops["_to_copy"] <= 2 * layers + 40  # the fp32 gradients (CPU) and the UNet's own; no per-layer copy

    with torch.no_grad():  # an optimizer step (in place) and a load that replaces a tensor
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        torch._foreach_add_(params, [torch.full_like(p, 0.01) for p in params])
        params[0].data = params[0].data * 1.5
    model.zero_grad(set_to_none=True)
    loss, grads = loss_and_grads(model, BF16, True)
    fresh = unet(True, BF16, True)
    fresh.load_state_dict(model.state_dict())
    fresh_loss, fresh_grads = loss_and_grads(fresh, BF16, True)
    assert torch.equal(loss, fresh_loss)
    assert all(torch.equal(grads[n], fresh_grads[n]) for n in grads)


def test_fp32_products_where_the_device_writes_them():
    """CUDA's route for the factors' fp32 gradients (one product with ``out_dtype``) gives
    what the CPU's product-then-cast gives, to bf16 rounding; here on fake tensors, where
    the op exists without CUDA, and on a device without it the fallback is taken."""
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(8, 16, generator=g).to(BF16), torch.randn(16, 4, generator=g).to(BF16)
    master, low = torch.empty(8, 4), torch.empty(8, 4, dtype=BF16)  # addmm's ignored input (beta=0)
    plain = fast._fp32_product(m1, m2, 0.5, master, low)
    assert plain.dtype == torch.float32
    assert torch.allclose(plain, 0.5 * (m1.float() @ m2.float()), rtol=2 ** -7, atol=1e-2)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode, Ops() as ops:
        f1, f2, f3, f4 = (mode.from_tensor(t) for t in (m1, m2, master, low))
        saved = dict(fast._OUT_DTYPE)
        try:
            fast._OUT_DTYPE["cpu"] = True
            out = fast._fp32_product(f1, f2, 0.5, f3, f4)
        finally:
            fast._OUT_DTYPE.clear()
            fast._OUT_DTYPE.update(saved)
    assert out.dtype == torch.float32 and out.shape == (8, 4)
    assert ops.ops["addmm"] == 1 and ops.ops["_to_copy"] == 0
