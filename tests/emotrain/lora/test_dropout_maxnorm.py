"""LoRA dropout (emotrain/lora/dropout.py) and max-norm (emotrain/lora/maxnorm.py) against
sd-scripts' definitions, written out by hand here on a two-layer model."""

import pytest
import torch
from peft import LoraConfig

from emotrain.lora import dropout, maxnorm
from emotrain.lora.inject import add_lora

RANK, ALPHA = 4, 2.0
SCALE = ALPHA / RANK


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 6)
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)


def net(fast: bool = True):
    torch.manual_seed(0)
    model = Net()
    add_lora(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["lin", "conv"]), fast=fast)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def factors(layer):
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def by_hand(layer, x, keep_h=None, keep_rank=None, rank_p=0.0):
    """W x + b + s/(1-rank_p) * B((A x) * keep_h * keep_rank), for the Linear layer."""
    A, B = factors(layer)
    h = x @ A.t()
    if keep_h is not None:
        h = h * keep_h
    if keep_rank is not None:
        h = h * keep_rank
    return layer.base_layer(x) + (SCALE / (1 - rank_p)) * h @ B.t()


def kept(mask):
    """1 where a mask keeps, 0 where it drops (an fp32 mask also carries the LoRA's scale)."""
    return (mask != 0).float()


def test_no_layer_changes_without_dropout():
    model = net()
    kinds = {type(m) for m in model.modules()}
    assert dropout.install([model], 0.0, 0.0, 0.0) is None
    assert {type(m) for m in model.modules()} == kinds


def test_network_dropout_drops_rank_neurons_scaled_by_1_over_1_minus_p():
    model, p = net(), 0.5
    drop = dropout.install([model], p, 0.0, 0.0)
    x = torch.randn(64, 10, 8)  # (batch, tokens, features)
    plain = by_hand(model.lin, x)
    torch.testing.assert_close(model.lin(x), plain)  # outside a micro-batch: the plain LoRA
    state = torch.random.get_rng_state()
    with drop.micro_batch(torch.Generator().manual_seed(5)):
        out = model.lin(x)
        keep_h, _ = drop.drawn[model.lin.emotrain_dropout_index][1:3]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is never drawn from
    # fp32: the mask carries the scale and 1/(1-p), in place of peft's multiply by the scale
    assert keep_h.shape == (64, 10, RANK) and keep_h.unique().tolist() == pytest.approx([0.0, SCALE / (1 - p)])
    assert abs((keep_h == 0).float().mean().item() - p) < 0.05  # each neuron at each position
    torch.testing.assert_close(out, by_hand(model.lin, x, keep_h=kept(keep_h) / (1 - p)))  # kept ones x 1/(1-p)
    torch.testing.assert_close(model.lin(x), plain)  # and after it


def test_rank_dropout_masks_ranks_per_sample_and_rescales():
    model, p = net(), 0.25
    drop = dropout.install([model], 0.0, p, 0.0)
    x = torch.randn(256, 7, 8)
    with drop.micro_batch(torch.Generator().manual_seed(6)):
        out = model.lin(x)
        _, keep_rank = drop.drawn[model.lin.emotrain_dropout_index][1:3]
        conv_out = model.conv(torch.randn(4, 3, 6, 6))
        conv_keep = drop.drawn[model.conv.emotrain_dropout_index][2]
    assert keep_rank.shape == (256, 1, RANK) and keep_rank.unique().tolist() == pytest.approx([0.0, SCALE / (1 - p)])
    assert abs((keep_rank == 0).float().mean().item() - p) < 0.06
    torch.testing.assert_close(out, by_hand(model.lin, x, keep_rank=kept(keep_rank), rank_p=p))
    assert conv_keep.shape == (4, RANK, 1, 1) and conv_out.shape == (4, 5, 6, 6)  # per sample and rank of a conv


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32-peft-layers", "bf16-fused"])
@pytest.mark.parametrize("which", ["lin", "conv"])
def test_the_gradients_with_both_dropouts_are_the_formula_s_by_autograd(which, autocast):
    """The dropped LoRA's output and gradients (peft's layers in fp32; under autocast the
    fused forward's own backward, fast.py) against autograd through the formula in fp32,
    written with the reference model's plain modules and the run's masks."""
    model, reference, p, q = net(), net(), 0.3, 0.25
    drop = dropout.install([model], p, q, 0.0)
    layer, plain = getattr(model, which), getattr(reference, which)
    if autocast:  # as training holds it: the frozen base in bf16
        layer.base_layer.to(torch.bfloat16)
    shape = (4, 5, 8) if which == "lin" else (4, 3, 6, 6)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with drop.micro_batch(torch.Generator().manual_seed(3)), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = layer(x1)
        assert ("Lora" in type(out.grad_fn).__name__) == autocast  # the fused function's backward, or autograd's
        out.float().square().sum().backward()
        keep_h, keep_rank = drop.drawn[layer.emotrain_dropout_index][1:3]
    assert keep_h.shape[-1 if which == "lin" else 1] == RANK  # both masks were drawn
    h = plain.lora_A["default"](x2) * kept(keep_h) * kept(keep_rank)
    expected = plain.base_layer(x2) + SCALE / ((1 - p) * (1 - q)) * plain.lora_B["default"](h)
    expected.square().sum().backward()
    pairs = [(out.float(), expected), (x1.grad, x2.grad)] + \
        [(m.grad, t.grad) for m, t in zip(factors(layer), factors(plain))]
    for mine, theirs in pairs:
        if autocast:  # bf16 products: within a few bf16 roundings of the fp32 formula
            assert mine.dtype == theirs.dtype == torch.float32 or mine is pairs[1][0]
            assert ((mine.float() - theirs).norm() / theirs.norm()).item() < 0.02
        else:  # fp32, another order of sums
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_module_dropout_leaves_whole_modules_out():
    model, p = net(), 0.3
    drop = dropout.install([model], 0.0, 0.0, p)
    x, noise = torch.randn(2, 8), torch.Generator().manual_seed(7)
    plain, base = by_hand(model.lin, x), model.lin.base_layer(x)
    skipped = 0
    for _ in range(400):
        with drop.micro_batch(noise):
            out = model.lin(x)
        if torch.equal(out, base):
            skipped += 1
        else:
            torch.testing.assert_close(out, plain)
    assert abs(skipped / 400 - p) < 0.07


def test_the_same_generator_state_draws_the_same_masks_and_checkpointing_reuses_them():
    model = net()
    drop = dropout.install([model], 0.3, 0.3, 0.0)
    x = torch.randn(3, 5, 8, requires_grad=True)

    def grads(checkpointed: bool):
        model.zero_grad()
        with drop.micro_batch(torch.Generator().manual_seed(11)):
            out = torch.utils.checkpoint.checkpoint(model.lin, x, use_reentrant=False) if checkpointed \
                else model.lin(x)
            out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in factors(model.lin)]

    (a, ga), (b, gb) = grads(False), grads(True)
    assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(ga, gb))


def test_max_norm_scales_each_delta_above_the_limit_to_it():
    model = net()
    layers = [model.lin, model.conv]
    # the deltas by hand: s * B @ A (the conv's kernel flattened), and their Frobenius norms
    deltas = [SCALE * factors(m)[1].flatten(1) @ factors(m)[0].flatten(1) for m in layers]
    norms = [torch.linalg.norm(d).item() for d in deltas]
    limit = (norms[0] + norms[1]) / 2  # one above, one below
    above = 0 if norms[0] > limit else 1
    before = [[t.detach().clone() for t in factors(m)] for m in layers]
    found = maxnorm.lora_factors([model])
    assert maxnorm.delta_norms(found) == pytest.approx(norms, rel=1e-5)
    figures = maxnorm.apply(found, limit)
    after = [torch.linalg.norm(SCALE * factors(m)[1].flatten(1) @ factors(m)[0].flatten(1)).item() for m in layers]
    assert after[above] == pytest.approx(limit, rel=1e-5)
    assert all(torch.equal(t, u) for t, u in zip(factors(layers[1 - above]), before[1 - above]))  # untouched
    ratio = (limit / norms[above]) ** 0.5  # both factors times sqrt(limit / norm)
    torch.testing.assert_close(factors(layers[above])[0], before[above][0] * ratio)
    assert figures["max_norm/keys_scaled"] == 1
    assert figures["max_norm/max_key_norm"] == pytest.approx(limit, rel=1e-5)
    assert figures["max_norm/max_key_norm_before"] == pytest.approx(max(norms), rel=1e-5)
    assert figures["max_norm/average_key_norm"] == pytest.approx((limit + min(norms)) / 2, rel=1e-5)


def test_dropout_composes_with_the_fused_forward_under_autocast():
    from emotrain.lora import fast

    model, reference = net(), net()
    drop = dropout.install([model], 0.5, 0.25, 0.0)
    assert isinstance(model.lin, fast.FastLinear) and type(model.lin).__name__ == "DropoutFastLinear"
    x = torch.randn(16, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.lin(x), reference.lin(x))  # outside the window: the fused forward, unchanged
        with drop.micro_batch(torch.Generator().manual_seed(2)):
            out = model.lin(x)
            keep_h, keep_rank = drop.drawn[model.lin.emotrain_dropout_index][1:3]
    assert set(keep_h.unique().tolist()) == {0.0, 1.0}  # 0/1 masks, the factors on the products
    expected = by_hand(model.lin, x, kept(keep_h) / 0.5, kept(keep_rank), rank_p=0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
