"""Each optimizer actually optimizes: Rosenbrock and a small regression network."""

from __future__ import annotations

import pytest
import torch

from optim import EmoAiry, EmoCats, EmoSens

ALL = [EmoSens, EmoAiry, EmoCats]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threads only add contention on a busy 2-core CI box.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rosenbrock(xy):
    x, y = xy[0], xy[1]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


@pytest.mark.parametrize("use_shadow", [False, True])
@pytest.mark.parametrize("cls", ALL)
def test_rosenbrock_goes_clearly_downhill(cls, use_shadow):
    xy = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    opt = cls([xy], lr=1e-2, weight_decay=0.0, use_shadow=use_shadow)
    start = _rosenbrock(xy).item()

    def closure():
        opt.zero_grad()
        loss = _rosenbrock(xy)
        loss.backward()
        return loss

    for _ in range(2000):
        opt.step(closure)
    end = _rosenbrock(xy).item()
    assert end < 0.1 * start, (start, end)
    assert (xy.detach() - 1).norm() < 0.5  # near the minimum at (1, 1)


@pytest.mark.parametrize("use_shadow", [False, True])
@pytest.mark.parametrize("cls", ALL)
def test_regression_network_learns(cls, use_shadow):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    w_true = torch.randn(8, 1)
    y = torch.tanh(x @ w_true) + 0.01 * torch.randn(256, 1)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = cls(net.parameters(), lr=1e-2, use_shadow=use_shadow)
    with torch.no_grad():
        start = torch.nn.functional.mse_loss(net(x), y).item()
    for _ in range(400):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step(loss=loss)
    with torch.no_grad():
        end = torch.nn.functional.mse_loss(net(x), y).item()
    assert end < 0.2 * start, (start, end)
