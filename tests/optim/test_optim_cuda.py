"""optim on CUDA: the form every path takes there, against the oracle (skipped without CUDA).

The CPU suite already runs the accelerator form of the foreach path on CPU tensors
(the "device" path of test_optim_parity.py); these tests run it where it is meant to run,
with CUDA's own kernels, and check what only CUDA can show: that a step never waits for
the device.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from emo_api_helpers import ALL, _loss, _params, _set_grads  # noqa: E402
from test_optim_oracle import Oracle  # noqa: E402
from test_optim_parity import CLASSES, LOSSES, _max_diff, _run  # noqa: E402
from test_optim_state import bf16_step_is_fp32_step_rounded  # noqa: E402

from optim import EmoAiry, emoairy  # noqa: E402
from optim import _base  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PATHS = [dict(foreach=True), dict(foreach=False)]
IDS = ["foreach", "plain"]
KIND_OF = {cls: kind for kind, cls in CLASSES.items()}


@pytest.mark.parametrize("use_shadow", [False, True])
@pytest.mark.parametrize("path", PATHS, ids=IDS)
@pytest.mark.parametrize("kind", list(CLASSES))
def test_cuda_parity_fp32(kind, path, use_shadow):
    params, oracle, opt = _run(kind, path, torch.float32, use_shadow, device="cuda")
    assert all(p.is_cuda for p in params)
    assert abs(opt.emotion.s - oracle.s) < 1e-12
    assert _max_diff(params, oracle) <= 1e-6


@pytest.mark.parametrize("path", PATHS, ids=IDS)
@pytest.mark.parametrize("kind", list(CLASSES))
def test_cuda_parity_fp64_tight(kind, path):
    params, oracle, _ = _run(kind, path, torch.float64, True, device="cuda")
    assert _max_diff(params, oracle) <= 1e-12


@pytest.mark.parametrize("path", PATHS, ids=IDS)
@pytest.mark.parametrize("kind", list(CLASSES))
def test_cuda_parity_no_weight_decay_and_decoupled(kind, path):
    params, oracle, _ = _run(kind, path, torch.float32, False, wd=0.0, scheduled=False, device="cuda")
    assert _max_diff(params, oracle) <= 1e-6
    if kind == "emocats":
        params, oracle, _ = _run(kind, path, torch.float32, False, decoupled=True, device="cuda")
        assert _max_diff(params, oracle) <= 1e-6


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_cuda_emoairy_closed_matrix_filter(path):
    # eps = 0: a row and a conv column of tiny gradients close the factor filter (spec 5).
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(5, 6, generator=gen), torch.randn(3, 2, 2, 2, generator=gen),
            torch.randn(5, 6, generator=gen)]  # two of one shape: one stack, one open
    oracle = Oracle("emoairy", init, eps=0.0)
    params = [torch.nn.Parameter(t.clone().cuda()) for t in init]
    opt = EmoAiry(params, eps=0.0, **path)
    for L in LOSSES[:20]:
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        grads[0][2] = 1e-7
        grads[1][:, 1] = 1e-7
        for p, g in zip(params, grads):
            p.grad = g.cuda()
        opt.step(loss=L)
        oracle.step(grads, loss=L)
    assert _max_diff(params, oracle) <= 1e-6
    closed_row = params[0][2].cpu()
    assert torch.allclose(closed_row, init[0][2] * (1 - 1e-3 * 0.01) ** 20, rtol=1e-5, atol=0)


@pytest.mark.parametrize("foreach", [True, False], ids=IDS)
@pytest.mark.parametrize("cls", ALL)
def test_cuda_bf16_step_is_the_fp32_step_rounded(cls, foreach):
    bf16_step_is_fp32_step_rounded(cls, foreach, device="cuda")


@pytest.mark.parametrize("cls", ALL)
def test_cuda_step_never_waits_for_the_device(cls):
    """No host round trip in a step (no .item(), no nonzero()): the host can queue the
    next work while the GPU runs. Shadow on, with a loss drop, so the blend runs too."""
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(p.detach().cuda()) for p in _params(dtype=dtype)]
        opt = cls(params, use_shadow=True)
        for t in range(4):
            _set_grads(params, t)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step(loss=1.0 if t < 2 else 0.2)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert all("shadow" in opt.state[p] for p in params)


@pytest.mark.parametrize("cls", ALL)
def test_cuda_foreach_runs_the_accelerator_form(cls, monkeypatch):
    calls = []
    real_masks, real_stacked = _base.open_masks, emoairy.emoairy_matrix_stacked
    for module in ("emosens", "emocats"):
        monkeypatch.setattr(f"optim.{module}.open_masks", lambda *a, **k: (calls.append("mask"), real_masks(*a, **k))[1])
    monkeypatch.setattr(emoairy, "emoairy_matrix_stacked",
                        lambda *a: (calls.append("stacked"), real_stacked(*a))[1])
    _run(KIND_OF[cls], dict(foreach=True), torch.float32, False, device="cuda")
    assert calls and set(calls) <= {"mask", "stacked"}
    assert ("stacked" in calls) == (cls is EmoAiry)


@pytest.mark.parametrize("cls", ALL)
def test_cuda_fused_warns_once_and_equals_foreach(cls):
    results = []
    for kw in (dict(fused=True), dict(foreach=True)):
        params = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
        opt = cls(params, use_shadow=True, **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t in range(6):
                _set_grads(params, t)
                opt.step(loss=_loss(t))
        results.append(([p.detach().clone() for p in params], caught))
    (fused, warned), (foreach, _) = results
    assert len([w for w in warned if "fused=True" in str(w.message)]) == 1
    assert all(torch.equal(a, b) for a, b in zip(fused, foreach))
