"""Behaviour around the update rule: loss intake, checkpoints, precision, groups, planner API."""

from __future__ import annotations

import importlib
import io
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_optim_oracle import Oracle  # noqa: E402

import optim  # noqa: E402
from optim import EmoAiry, EmoCats, EmoSens, state_nbytes  # noqa: E402

ALL = [EmoSens, EmoAiry, EmoCats]
KIND = {EmoSens: "emosens", EmoAiry: "emoairy", EmoCats: "emocats"}
SHAPES = [(7,), (6, 5), (4, 3, 3, 3)]


def _params(seed=0, dtype=torch.float32, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _set_grads(params, step, seed=100):
    gen = torch.Generator().manual_seed(seed + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _loss(step):
    return 1.0 / (1 + 0.2 * step) + (0.3 if step % 9 == 4 else 0.0)


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


# ---- loss intake ----------------------------------------------------------------------

@pytest.mark.parametrize("cls", ALL)
def test_step_without_loss_warns_once_and_keeps_emotion(cls):
    p = _params()
    opt = cls(p, use_shadow=True)
    for t in range(6):
        _set_grads(p, t)
        opt.step(loss=_loss(t) * 3)
    before = opt.emotion
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for t in range(6, 9):
            _set_grads(p, t)
            opt.step()
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and "emotion state is unchanged" in msgs[0] and "loss=" in msgs[0]
    after = opt.emotion
    assert (after.s, after.short, after.long, after.history, after.should_stop) == (
        before.s, before.short, before.long, before.history, before.should_stop)
    assert after.step == before.step + 3
    # The no-loss steps use the last s: same as the oracle fed None.
    q = _params()
    opt_q = cls(q)
    o2 = Oracle(KIND[cls], [x.detach().clone() for x in q])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(5):
            _set_grads(q, t)
            L = _loss(t) * 3 if t < 3 else None
            opt_q.step(loss=L)
            o2.step([x.grad for x in q], loss=L)
    assert max((x.detach() - y).abs().max().item() for x, y in zip(q, o2.p)) <= 1e-6


def test_step_without_any_loss_uses_s_zero_like_kohya():
    mod, _, name = "optim.EmoSens".rpartition(".")
    cls = getattr(importlib.import_module(mod), name)
    p = _params()
    opt = cls(p, lr=1e-3, **{"use_shadow": True})  # kohya: Cls(params, lr=..., **kwargs)
    with pytest.warns(UserWarning, match="emotion state is unchanged"):
        _set_grads(p, 0)
        assert opt.step() is None
    assert opt.emotion.s == 0.0 and not opt.emotion.loss_seen
    assert not any("shadow" in st for st in opt.state.values())


@pytest.mark.parametrize("cls", ALL)
def test_closure_runs_with_grad_and_its_loss_is_used(cls):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = cls(model.parameters())
    seen = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        seen.append(loss.item())
        return loss

    out = opt.step(closure)
    assert isinstance(out, torch.Tensor) and out.item() == seen[0]
    assert opt.emotion.short == pytest.approx(seen[0]) and opt.emotion.loss_seen
    # a closure returning a plain float (accelerate: optimizer.step(lambda: loss_value))
    assert opt.step(lambda: 0.5) == 0.5
    assert opt.emotion.short == pytest.approx(0.3 * 0.5 + 0.7 * seen[0])


def test_loss_keyword_accepts_float_and_zero_dim_tensor():
    p = _params()
    opt = EmoAiry(p)
    _set_grads(p, 0)
    assert opt.step(loss=2.0) == 2.0
    t = torch.tensor(1.0, requires_grad=True) * 1.5
    _set_grads(p, 1)
    assert opt.step(loss=t) is t
    assert opt.emotion.short == pytest.approx(0.3 * 1.5 + 0.7 * 2.0)
    with pytest.raises(ValueError):
        opt.step(loss=torch.ones(2))


def test_emotion_view_is_read_only():
    opt = EmoSens(_params())
    with pytest.raises(AttributeError):
        opt.emotion.s = 1.0
    with pytest.raises(AttributeError):
        opt.emotion = None


def test_should_stop_not_before_32_steps_and_fires_on_calm():
    p = _params()
    opt = EmoSens(p)
    for t in range(31):
        _set_grads(p, t)
        opt.step(loss=1.0)
        assert not opt.emotion.should_stop
    _set_grads(p, 31)
    opt.step(loss=1.0)
    assert opt.emotion.should_stop
    # sticky, even when the loss becomes agitated
    for t in range(5):
        opt.step(loss=10.0 * (t % 2))
    assert opt.emotion.should_stop


def test_should_stop_stays_off_on_agitated_losses():
    opt = EmoCats(_params())
    for t in range(80):
        opt.step(loss=1.0 + (0.5 if t % 3 == 0 else 0.0) - 0.005 * t)
    assert not opt.emotion.should_stop
    assert len(opt.emotion.history) == 32


# ---- AMP, accelerate -------------------------------------------------------------------

def _scaler():
    try:
        return torch.amp.GradScaler("cpu", init_scale=1024.0)
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"GradScaler('cpu') unsupported: {exc}")


@pytest.mark.parametrize("cls", ALL)
def test_gradscaler_step_with_loss_keyword(cls):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ref = torch.nn.Linear(4, 2)
    ref.load_state_dict(model.state_dict())
    opt, opt_ref = cls(model.parameters()), cls(ref.parameters())
    scaler = _scaler()
    x = torch.randn(8, 4)
    for t in range(3):
        loss = model(x).square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt, loss=loss)  # GradScaler forwards keywords
        scaler.update()
        opt.zero_grad()
        loss_ref = ref(x).square().mean()
        loss_ref.backward()
        opt_ref.step(loss=loss_ref)
        opt_ref.zero_grad()
    assert opt.emotion.loss_seen and opt.emotion == opt_ref.emotion
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # closure passed positionally, as accelerate's wrapper does
    loss = model(x).square().mean()
    scaler.scale(loss).backward()
    value = loss.item()
    scaler.step(opt, lambda: value)
    assert opt.emotion.short == pytest.approx(0.3 * value + 0.7 * opt_ref.emotion.short)


def test_accelerate_wrapper_forwards_the_closure():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState
    try:
        accelerate.Accelerator(cpu=True)
        model = torch.nn.Linear(3, 1)
        opt = AcceleratedOptimizer(EmoSens(model.parameters()), device_placement=False)
    except Exception as exc:  # pragma: no cover - environment dependent
        pytest.skip(f"accelerate unavailable here: {exc}")
    try:
        model(torch.randn(4, 3)).sum().backward()
        opt.step(lambda: 0.75)
        assert opt.optimizer.emotion.short == pytest.approx(0.75) and opt.optimizer.emotion.loss_seen
    finally:
        AcceleratorState._reset_state(True)


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


@pytest.mark.parametrize("cls", ALL)
def test_low_precision_update_equals_fp32_update_rounded(cls):
    # Same start values in bf16 and fp32: each bf16 step is the fp32 step rounded once.
    p16 = _params(dtype=torch.bfloat16)
    p32 = [torch.nn.Parameter(x.detach().float()) for x in p16]
    o16, o32 = cls(p16, lr=1e-2), cls(p32, lr=1e-2)
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


def test_package_imports_torch_only():
    import ast
    import pathlib
    root = pathlib.Path(optim.__file__).parent
    allowed = {"torch", "__future__"} | set(sys.stdlib_module_names)
    for f in root.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{f.name} imports {name}"


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
