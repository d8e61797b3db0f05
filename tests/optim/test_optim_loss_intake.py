"""Loss intake and the emotion state: no-loss steps, closures, the loss keyword, the
read-only view, the calm signal, GradScaler and accelerate (optim/SPEC.md sections 1 and 7)."""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from emo_api_helpers import ALL, KIND, _loss, _params, _set_grads  # noqa: E402
from test_optim_oracle import Oracle  # noqa: E402

from optim import EmoAiry, EmoCats, EmoSens  # noqa: E402


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
