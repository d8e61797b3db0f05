"""Every path of every optimizer against the independent oracle (test_optim_oracle.py)."""

from __future__ import annotations

import contextlib
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_optim_oracle import Oracle  # noqa: E402

from optim import EmoAiry, EmoCats, EmoSens, _base  # noqa: E402

CLASSES = {"emosens": EmoSens, "emoairy": EmoAiry, "emocats": EmoCats}
SHAPES = [(17,), (12, 9), (6, 4, 3, 3), ()]
STEPS = 50

# Calm, then a small drop (|s| in (0.1, 0.6]), a large drop (|s| > 0.6), a rise, noise.
LOSSES = ([1.0] * 8 + [0.97] * 6 + [0.5] * 8 + [0.55] * 4 + [1.4] * 8
          + [1.0 + 0.03 * math.sin(i) for i in range(16)])
assert len(LOSSES) == STEPS


PATH_IDS = ["foreach", "plain", "fused", "device"]


def _paths():
    # "device": the foreach path in the form it takes on CUDA (on_accelerator), run here
    # on the CPU so that every machine checks its math.
    return [dict(foreach=True), dict(foreach=False), dict(fused=True), dict(foreach=True, device_form=True)]


@contextlib.contextmanager
def _taking(path):
    """The constructor keywords of ``path``, with the accelerator form switched on if asked."""
    path = dict(path)
    saved = _base._DEVICE_PATH_ON_CPU
    _base._DEVICE_PATH_ON_CPU = path.pop("device_form", False)
    try:
        yield path
    finally:
        _base._DEVICE_PATH_ON_CPU = saved


def _grads(step, params, gen):
    """Random gradients with exact zeros, filter-closing tiny entries and an empty step."""
    out = []
    for i, p in enumerate(params):
        if i == 1 and step % 7 == 3:
            out.append(None)  # a parameter without gradient this step
            continue
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1
        flat = g.view(-1)
        if flat.numel() >= 8:
            flat[0] = 0.0
            flat[1] = 1e-14          # root 2.2e-5: always below the threshold
            flat[2] = -3e-12         # root 1.4e-4: passes only while |s| < 0.44
            flat[3] = 1e-11          # root 2.2e-4: always passes
            flat[4] = 4e-13          # g*g root tiny: EmoAiry's vector mask closes
        if i == 2 and step == 5:
            g.zero_()
        out.append(g.to(p.dtype))
    return out


def _run(kind, path, dtype, use_shadow, decoupled=False, shapes=SHAPES, eps=1e-8,
         wd=0.01, scheduled=True, device="cpu", oracle_dtype=None):
    """``steps`` of optimizer ``kind`` (on ``device``) and of the oracle (on the CPU, in
    ``oracle_dtype``, default ``dtype``) from the same start and gradients."""
    gen = torch.Generator().manual_seed(1234)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).mul_(0.5).to(dtype)
            for s in shapes]
    kw = dict(lr=2e-3, eps=eps, weight_decay=wd, use_shadow=use_shadow)
    if decoupled:
        kw["decoupled_weight_decay"] = True
    oracle = Oracle(kind, [t.to(oracle_dtype or dtype) for t in init], **kw)
    params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    with _taking(path) as path:
        opt = CLASSES[kind](params, **kw, **path)
        for step, L in enumerate(LOSSES):
            lr = 2e-3 * (1 - step / (2 * STEPS)) if scheduled else 2e-3
            grads = _grads(step, params, gen)
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.to(device)
            opt.param_groups[0]["lr"] = lr
            opt.step(loss=L)
            oracle.step([None if g is None else g.to(oracle_dtype or dtype) for g in grads], loss=L, lr=lr)
    return params, oracle, opt


def _max_diff(params, oracle):
    return max((p.detach().cpu().to(q.dtype) - q).abs().max().item() for p, q in zip(params, oracle.p))


@pytest.mark.parametrize("use_shadow", [False, True])
@pytest.mark.parametrize("path", _paths(), ids=PATH_IDS)
@pytest.mark.parametrize("kind", list(CLASSES))
def test_parity_fp32(kind, path, use_shadow):
    params, oracle, opt = _run(kind, path, torch.float32, use_shadow)
    if use_shadow:  # the loss sequence crosses every band of the ratio
        assert 0.0 in oracle.ratios
        assert any(0.1 < r <= 0.6 for r in oracle.ratios)
        assert any(r > 0.6 for r in oracle.ratios)
        assert all("shadow" in opt.state[p] for p in params)
    assert abs(opt.emotion.s - oracle.s) < 1e-12
    # The updates really moved the parameters (the comparison is not vacuous).
    moved = max((p.detach() - torch.zeros_like(p)).abs().max().item() for p in params)
    assert moved > 0
    assert _max_diff(params, oracle) <= 1e-6


@pytest.mark.parametrize("path", _paths(), ids=PATH_IDS)
@pytest.mark.parametrize("kind", list(CLASSES))
def test_parity_fp64_tight(kind, path):
    params, oracle, _ = _run(kind, path, torch.float64, True)
    assert _max_diff(params, oracle) <= 1e-12


@pytest.mark.parametrize("path", _paths(), ids=PATH_IDS)
def test_parity_emocats_decoupled_decay(path):
    params, oracle, _ = _run("emocats", path, torch.float32, False, decoupled=True)
    assert _max_diff(params, oracle) <= 1e-6


@pytest.mark.parametrize("path", _paths(), ids=PATH_IDS)
@pytest.mark.parametrize("kind", list(CLASSES))
def test_parity_no_weight_decay(kind, path):
    params, oracle, _ = _run(kind, path, torch.float32, False, wd=0.0, scheduled=False)
    assert _max_diff(params, oracle) <= 1e-6


@pytest.mark.parametrize("path", _paths(), ids=PATH_IDS)
def test_parity_emoairy_closed_matrix_filter(path):
    # With eps = 0 a row of tiny gradients closes EmoAiry's matrix filter (spec 5).
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(5, 6, generator=gen), torch.randn(3, 2, 2, 2, generator=gen)]
    oracle = Oracle("emoairy", init, eps=0.0)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    with _taking(path) as path:
        opt = EmoAiry(params, eps=0.0, **path)
        for L in LOSSES[:20]:
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            grads[0][2] = 1e-7       # row 2: mean g*g = 1e-14 < threshold ** 3
            grads[1][:, 1] = 1e-7    # column 1 of the conv factorisation
            for p, g in zip(params, grads):
                p.grad = g
            opt.step(loss=L)
            oracle.step(grads, loss=L)
    assert _max_diff(params, oracle) <= 1e-6
    # Only the decay touched the closed row: it shrank by exactly (1 - lr*wd) per step.
    assert torch.allclose(params[0][2], init[0][2] * (1 - 1e-3 * 0.01) ** 20, rtol=1e-5, atol=0)


@pytest.mark.parametrize("chunk", [1 << 24, 200], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("kind", list(CLASSES))
def test_parity_device_form_same_shape_stacks(kind, chunk, monkeypatch):
    # Repeated shapes make real stacks in EmoAiry's accelerator form; a small chunk size
    # splits the list (and a stack) across chunks.
    monkeypatch.setattr(_base, "DEVICE_CHUNK_NUMEL", chunk)
    shapes = [(12, 9), (17,), (12, 9), (6, 4, 3, 3), (9, 12), (6, 4, 3, 3), (12, 9)]
    params, oracle, _ = _run(kind, dict(foreach=True, device_form=True), torch.float32, True, shapes=shapes)
    assert _max_diff(params, oracle) <= 1e-6


def test_oracle_disagrees_with_a_wrong_rule():
    """The comparison can fail: EmoSens with bias correction is not EmoSens."""
    params, oracle, _ = _run("emosens", dict(foreach=True), torch.float32, False)
    oracle_b = Oracle("emosens", [torch.zeros(3)], lr=1.0, weight_decay=0.0)
    oracle_b.step([torch.ones(3)], loss=1.0)
    assert abs(oracle_b.p[0][0].item() + 3.16) < 0.01  # would be -1.0 with bias correction
    oracle.p[0] = oracle.p[0] + 2e-6
    assert _max_diff(params, oracle) > 1e-6


@pytest.mark.parametrize("kind", list(CLASSES))
def test_fused_path_really_runs_the_native_kernels(kind, monkeypatch):
    from optim import _native
    if not _native.available():
        pytest.skip(f"fused kernels unavailable: {_native._error}")
    calls = []
    real = _native.launch
    monkeypatch.setattr(_native, "launch", lambda name, *a: (calls.append(name), real(name, *a)))
    _run(kind, dict(fused=True), torch.float32, True)
    assert len(calls) >= STEPS


@pytest.mark.parametrize("path", _paths(), ids=PATH_IDS)
@pytest.mark.parametrize("kind", list(CLASSES))
def test_parity_channels_last_conv(kind, path):
    # Non-contiguous layouts: the fused path falls back, the others work in place.
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(6, 4, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last)]
    oracle = Oracle(kind, init, use_shadow=True)
    params = [torch.nn.Parameter(init[0].clone(memory_format=torch.channels_last))]
    with _taking(path) as path:
        opt = CLASSES[kind](params, use_shadow=True, **path)
        for L in LOSSES[:30]:
            g = torch.randn(6, 4, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last)
            params[0].grad = g
            opt.step(loss=L)
            oracle.step([g], loss=L)
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    assert _max_diff(params, oracle) <= 1e-6


def test_fused_without_compiler_warns_once_and_falls_back(monkeypatch):
    from optim import _native
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_error", "no C compiler found")
    with pytest.warns(UserWarning, match="no C compiler found"):
        params, oracle, _ = _run("emosens", dict(fused=True), torch.float32, False)
    assert _max_diff(params, oracle) <= 1e-6
