"""One host sync per training step, after the backward: the loop reads the step's loss
once (``processes.agree``), and nothing else on the step path (micro-batches, the loss,
the hooks that run every step, the optimizer in its accelerator form) waits on the device.

On the CPU nothing waits, so the syncs are counted where they would happen on a GPU:
every ``.item()``, ``float()``, ``bool()``, ``int()`` of a tensor dispatches
``aten._local_scalar_dense``, and ``nonzero``-like operations need the host to learn a
size; a dispatch mode records each with the emotrain or optim function that asked
(from the first step on). Reading the cache's files makes host tensors, which are not
device syncs: those reads are left out.
"""

import collections
import traceback
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

from helpers import train  # first: the command line hides bitsandbytes before diffusers loads

import optim._base  # noqa: E402
from emotrain.run import loop  # noqa: E402

HOST_ONLY = {"latent_cache.py"}  # tensors read from files, on the host on any machine
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim"}


class Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.step = 0  # optimizer steps begun
        self.sites = collections.Counter()  # (step, file, function) -> syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            ours = [f for f in traceback.extract_stack()[:-1] if "/emotrain/" in f.filename or "/optim/" in f.filename]
            frame = ours[-1] if ours else traceback.extract_stack()[-2]
            if Path(frame.filename).name not in HOST_ONLY:
                self.sites[(self.step, Path(frame.filename).name, frame.name)] += 1
        return func(*args, **(kwargs or {}))


def test_one_host_sync_per_step(tmp_path, monkeypatch):
    grad_accum = 2  # one sync per step, not per micro-batch
    syncs = Syncs()
    step = loop.optimizer_step

    def counted(run):
        if not syncs.step:
            syncs.__enter__()  # from the first step on (building the model is not counted)
        syncs.step += 1
        return step(run)

    monkeypatch.setattr(loop, "optimizer_step", counted)
    monkeypatch.setattr(optim._base, "_DEVICE_PATH_ON_CPU", True)  # the optimizer's GPU form
    steps = 3
    try:
        train(tmp_path / "run", "--steps", str(steps), "--grad-accum", str(grad_accum), "--optim", "emoairy",
              "--log-every", "100", "--save-every", "0")
    finally:
        if syncs.step:
            syncs.__exit__(None, None, None)
    # Steps 1..steps-1 run from one optimizer_step to the next (the last step is logged and
    # followed by the final save, which may read the device as they please).
    per_step = {s: {site[1:]: n for site, n in syncs.sites.items() if site[0] == s} for s in range(1, steps)}
    assert per_step == {s: {("processes.py", "agree"): 1} for s in range(1, steps)}
    # the count sees syncs where there are some: the logged last step reads the gradient norm
    assert any(site[0] == steps and site[2] == "after_step" for site in syncs.sites)
