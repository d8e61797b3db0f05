"""Behaviour around the update rule that is not loss intake: checkpoints, precision,
parameter groups and schedulers, and the state bytes the VRAM planner counts
(optim/SPEC.md sections 8 and 9)."""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from emo_api_helpers import ALL, KIND, SHAPES, _loss, _params, _set_grads  # noqa: E402
from test_optim_oracle import Oracle  # noqa: E402

from optim import EmoAiry, EmoCats, EmoSens, _base, state_nbytes  # noqa: E402


def _clone_state(opt):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v)
            for st in opt.state.values() for k, v in st.items()}


# ---- checkpoints -------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cls", ALL)
def test_resume_is_bit_identical(cls, fused):
    a = _params()
    opt_a = cls(a, lr=1e-2, use_shadow=True, fused=fused)
    b = _params()
    opt_b = cls(b, lr=1e-2, use_shadow=True, fused=fused)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda t: 1 / (1 + 0.05 * t))
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda t: 1 / (1 + 0.05 * t))
    for t in range(12):
        for params, opt, sched in ((a, opt_a, sched_a), (b, opt_b, sched_b)):
            _set_grads(params, t)
            opt.step(loss=_loss(t))
            sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt_b.state_dict(), "sched": sched_b.state_dict(),
                "params": [p.detach().clone() for p in b]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c = [torch.nn.Parameter(t) for t in ckpt["params"]]
    opt_c = cls(c, lr=1e-2, use_shadow=True, fused=fused)
    sched_c = torch.optim.lr_scheduler.LambdaLR(opt_c, lambda t: 1 / (1 + 0.05 * t))
    opt_c.load_state_dict(ckpt["opt"])
    sched_c.load_state_dict(ckpt["sched"])
    assert opt_c.emotion == opt_a.emotion
    for t in range(12, 40):
        for params, opt, sched in ((a, opt_a, sched_a), (c, opt_c, sched_c)):
            _set_grads(params, t)
            opt.step(loss=_loss(t))
            sched.step()
    assert any("shadow" in st for st in opt_a.state.values())
    for p, q in zip(a, c):
        assert torch.equal(p, q)
    sa, sc = _clone_state(opt_a), _clone_state(opt_c)
    for k in sa:
        assert torch.equal(sa[k], sc[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sc[k]
    assert opt_a.emotion == opt_c.emotion
    assert opt_c.param_groups[0]["lr0"] == 1e-2


def test_state_dict_holds_the_global_emotion_state():
    p = _params()
    opt = EmoCats(p, lr=3e-3, decoupled_weight_decay=True)
    for t in range(5):
        _set_grads(p, t)
        opt.step(loss=_loss(t))
    sd = opt.state_dict()
    emo = sd["emotion"]
    assert set(emo) >= {"short", "long", "s", "history", "should_stop", "step", "loss_seen"}
    assert emo["step"] == 5 and emo["loss_seen"] and len(emo["history"]) == 5
    assert sd["param_groups"][0]["lr0"] == 3e-3
    # Loading into a fresh optimizer restores it; loading does not alias the saved tensors.
    q = _params()
    opt2 = EmoCats(q, lr=3e-3, decoupled_weight_decay=True)
    opt2.load_state_dict(sd)
    assert opt2.emotion == opt.emotion
    assert opt2.state[q[0]]["exp_avg"].data_ptr() != opt.state[p[0]]["exp_avg"].data_ptr()


def test_deepcopy_keeps_the_emotion_state():
    import copy
    p = _params()
    opt = EmoSens(p, sync_loss=False)
    for t in range(3):
        _set_grads(p, t)
        opt.step(loss=_loss(t))
    twin = copy.deepcopy(opt)
    assert twin.emotion == opt.emotion and twin.sync_loss is False
    _set_grads(p, 3)
    opt.step(loss=0.1)
    assert twin.emotion != opt.emotion


# ---- precision -----------------------------------------------------------------------

@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", ALL)
def test_low_precision_params_get_fp32_state_and_fp32_math(cls, dtype, foreach):
    p = _params(dtype=dtype)
    opt = cls(p, lr=1e-2, use_shadow=True, foreach=foreach)
    for t in range(25):
        _set_grads(p, t)
        opt.step(loss=1.0 if t < 5 else 0.2)  # the drop allocates the shadow too
    assert all("shadow" in opt.state[x] for x in p)
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                assert v.dtype == torch.float32
    for x in p:
        assert x.dtype == dtype


def bf16_step_is_fp32_step_rounded(cls, foreach: bool, device: str = "cpu") -> None:
    """Same start values in bf16 and fp32: each bf16 step is the fp32 step rounded once."""
    p16 = [torch.nn.Parameter(x.detach().to(device)) for x in _params(dtype=torch.bfloat16)]
    p32 = [torch.nn.Parameter(x.detach().float()) for x in p16]
    o16, o32 = cls(p16, lr=1e-2, foreach=foreach), cls(p32, lr=1e-2, foreach=foreach)
    for t in range(5):
        _set_grads(p16, t)
        for a, b in zip(p32, p16):
            a.grad = b.grad.float()
        o16.step(loss=_loss(t))
        o32.step(loss=_loss(t))
        for a, b in zip(p32, p16):
            assert torch.equal(a.detach().to(torch.bfloat16), b.detach())
            a.data.copy_(b.detach().float())  # continue from the rounded values
    # the second moment of a bf16 parameter still decays (it would not in bf16)
    st = o16.state[p16[0]]
    if "exp_avg_sq" in st:
        assert st["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("form", ["foreach", "plain", "device"])
@pytest.mark.parametrize("cls", ALL)
def test_low_precision_update_equals_fp32_update_rounded(cls, form, monkeypatch):
    # "device": the foreach path in its CUDA form (on_accelerator), here on the CPU.
    monkeypatch.setattr(_base, "_DEVICE_PATH_ON_CPU", form == "device")
    bf16_step_is_fp32_step_rounded(cls, foreach=form != "plain")


def test_fp64_params_keep_fp64_state():
    p = _params(dtype=torch.float64)
    opt = EmoSens(p)
    _set_grads(p, 0)
    opt.step(loss=1.0)
    assert all(v.dtype == torch.float64 for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


# ---- parameter groups and schedulers ----------------------------------------------------

@pytest.mark.parametrize("cls", ALL)
def test_param_groups_and_lambda_lr_are_honoured(cls):
    p = _params()
    kind = KIND[cls]
    extra = {"decoupled_weight_decay": True} if cls is EmoCats else {}
    opt = cls([{"params": p[:2], "lr": 4e-3, "weight_decay": 0.1},
               {"params": p[2:]}], lr=1e-3, weight_decay=0.0, **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    o1 = Oracle(kind, [x.detach() for x in p[:2]], lr=4e-3, weight_decay=0.1, **extra)
    o2 = Oracle(kind, [x.detach() for x in p[2:]], lr=1e-3, weight_decay=0.0, **extra)
    assert [g["lr0"] for g in opt.param_groups] == [4e-3, 1e-3]
    for t in range(6):
        _set_grads(p, t)
        lrs = [g["lr"] for g in opt.param_groups]
        opt.step(loss=_loss(t))
        o1.step([x.grad for x in p[:2]], loss=_loss(t), lr=lrs[0])
        o2.step([x.grad for x in p[2:]], loss=_loss(t), lr=lrs[1])
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-3 * 0.5 ** 6)
    assert [g["lr0"] for g in opt.param_groups] == [4e-3, 1e-3]
    for x, y in zip(p, o1.p + o2.p):
        assert (x.detach() - y).abs().max().item() <= 1e-6


# ---- state bytes for the VRAM planner ---------------------------------------------------

@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cls", ALL)
def test_planned_state_bytes_equal_measured(cls, fused):
    shapes = SHAPES + [(3,), (8, 2, 1, 1)]
    meta = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in shapes]
    planner = cls(meta, use_shadow=True, fused=fused)
    planner.init_state()
    planned = state_nbytes(planner)
    n = sum(torch.Size(s).numel() for s in shapes)
    expected = {EmoSens: 3 * n * 4, EmoCats: 2 * n * 4}.get(cls)
    if expected is not None:
        assert planned == expected
    else:  # EmoAiry: vectors two full states, matrices d0 + prod(rest), plus shadow
        fac = sum(s[0] + torch.Size(s[1:]).numel() if len(s) >= 2 else 2 * s[0] for s in shapes)
        assert planned == (fac + n) * 4
    p = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = cls(p, use_shadow=True, fused=fused)
    for t in range(25):  # the loss drop pushes |s| over 0.1, which allocates the shadow
        _set_grads(p, t)
        opt.step(loss=1.0 if t < 5 else 0.2)
    assert all("shadow" in opt.state[x] for x in p)
    assert state_nbytes(opt) == planned
    without = cls(meta, use_shadow=True)
    without.init_state(include_shadow=False)
    assert state_nbytes(without) == planned - n * 4


@pytest.mark.parametrize("cls", ALL)
def test_init_state_keeps_first_step_semantics(cls):
    p = _params()
    q = [torch.nn.Parameter(x.detach().clone()) for x in p]
    a = cls(p, use_shadow=True)
    b = cls(q, use_shadow=True)
    b.init_state()
    assert b.emotion.step == 0
    assert all(torch.equal(x, y) for x, y in zip(p, q))
    for t in range(20):
        _set_grads(p, t)
        _set_grads(q, t)
        a.step(loss=1.0 if t < 5 else 0.3)
        b.step(loss=1.0 if t < 5 else 0.3)
    assert all(torch.equal(x, y) for x, y in zip(p, q))


def test_state_nbytes_on_torch_and_bitsandbytes_optimizers():
    p = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    n = 64 * 32 + 32
    adam = torch.optim.AdamW(p)
    for x in p:
        x.grad = torch.randn_like(x)
    adam.step()
    # exp_avg + exp_avg_sq (fp32) and a 0-dim fp32 step per parameter
    assert state_nbytes(adam) == 2 * n * 4 + 2 * 4
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]  # emotrain's command line, imported by an earlier test, blocks it
    try:
        import bitsandbytes as bnb
        big = [torch.nn.Parameter(torch.randn(256, 256))]
        big[0].grad = torch.randn_like(big[0])
        opt8 = bnb.optim.AdamW8bit(big)
        opt8.step()
    except Exception as exc:  # CPU support varies between bitsandbytes builds
        pytest.skip(f"bitsandbytes AdamW8bit unavailable on this machine: {exc}")
    nbytes = state_nbytes(opt8)
    assert 2 * 256 * 256 <= nbytes < 2 * 256 * 256 * 4 / 2  # 8-bit states, well under fp32


def test_state_nbytes_counts_shared_storage_once():
    p = torch.nn.Parameter(torch.randn(10))
    opt = torch.optim.SGD([p], lr=0.1)
    flat = torch.zeros(20)
    opt.state[p]["a"] = flat[:10]
    opt.state[p]["b"] = flat[10:]
    opt.state[p]["c"] = flat[:10]  # the same memory again
    assert state_nbytes(opt) == 20 * 4
