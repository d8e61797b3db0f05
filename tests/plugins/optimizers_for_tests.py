"""Optimizers that misbehave on purpose, for `--optim optimizers_for_tests.NAME` (tests/plugins/ is
on the path): a plain SGD that sends itself signals in the middle of an update, or
poisons its parameters, or fails."""

import os
import signal

import torch


class PlainSGD(torch.optim.Optimizer):
    """p -= lr * grad, one parameter at a time; ``during(step, index)`` runs between them."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, {"lr": lr})
        self.steps = 0

    def during(self, step: int, index: int) -> None:
        pass

    @torch.no_grad()
    def step(self, closure=None):
        self.steps += 1
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        for i, p in enumerate(params):
            p.add_(p.grad, alpha=-self.param_groups[0]["lr"])
            self.during(self.steps, i)
        return None


class SignalSGD(PlainSGD):
    """Sends itself ``count`` SIGINTs (or SIGTERMs) half-way through update ``at``."""

    def __init__(self, params, lr=1e-3, at=3, count=1, sig="SIGINT"):
        super().__init__(params, lr)
        self.at, self.count, self.sig = at, count, getattr(signal, sig)
        self.total = sum(p.numel() > 0 for group in self.param_groups for p in group["params"])

    def during(self, step, index):
        if step == self.at and index == self.total // 2:
            for _ in range(self.count):
                os.kill(os.getpid(), self.sig)


class PoisonSGD(PlainSGD):
    """Update ``at`` leaves the parameters nan (``what="params"``) or only its own state
    inf (``what="state"``)."""

    def __init__(self, params, lr=1e-3, at=3, what="params"):
        super().__init__(params, lr)
        self.at, self.what = at, what

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        if self.steps == self.at:
            for group in self.param_groups:
                for p in group["params"]:
                    if self.what == "params":
                        p.fill_(float("nan"))
                    else:
                        self.state[p]["buffer"] = torch.full_like(p, float("inf"))


class FailingSGD(PlainSGD):
    """Raises on update ``at``: an error nobody foresaw, in the middle of a run."""

    def __init__(self, params, lr=1e-3, at=2):
        super().__init__(params, lr)
        self.at = at

    def during(self, step, index):
        if step == self.at:
            raise RuntimeError("the optimizer broke")


class RemovingSGD(PlainSGD):
    """After update ``at``, removes ``path`` (a folder: the encoded-data cache, say), once:
    a resumed run leaves it."""

    def __init__(self, params, lr=1e-3, at=2, path=""):
        super().__init__(params, lr)
        self.at, self.path = at, path

    def step(self, closure=None):
        super().step(closure)
        done = f"{self.path}.removed"
        if self.steps == self.at and not os.path.exists(done):
            import shutil
            shutil.rmtree(self.path, ignore_errors=True)  # every process of a run removes it
            open(done, "w").close()
