"""Data parallel: the loss is averaged over ranks before it reaches the emotion state."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 12


def _worker(rank, init_file, out_dir, sync_loss):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        from optim import EmoAiry, EmoCats, EmoSens
        results = {}
        for cls in (EmoSens, EmoAiry, EmoCats):
            gen = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s, generator=gen))
                      for s in [(8,), (6, 4), (3, 2, 3, 3)]]
            opt = cls(params, lr=1e-2, use_shadow=True, sync_loss=sync_loss)
            for t in range(STEPS):
                for p in params:  # identical gradients on both ranks
                    p.grad = torch.randn(p.shape, generator=gen)
                # different per-rank losses: rank 1 sees a sharp drop that rank 0 does not
                loss = 1.0 if (rank == 0 or t < 4) else 0.3
                opt.step(loss=torch.tensor(loss, dtype=torch.float64))
            results[cls.__name__] = {"params": [p.detach().clone() for p in params],
                                     "emotion": opt.emotion._asdict()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path, sync_loss):
    out = tmp_path / ("sync" if sync_loss else "nosync")
    out.mkdir()
    mp.spawn(_worker, args=(str(tmp_path / f"init_{sync_loss}"), str(out), sync_loss),
             nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_replicas_stay_identical_only_with_loss_sync(tmp_path):
    r0, r1 = _run(tmp_path, sync_loss=True)
    for name in r0:
        assert r0[name]["emotion"] == r1[name]["emotion"]
        for a, b in zip(r0[name]["params"], r1[name]["params"]):
            assert torch.equal(a, b)
        # the emotion state saw the rank mean: 1.0 for 4 steps, then 0.65
        short = long = 1.0
        short, long = 0.3 * 1.0 + 0.7 * short, 0.01 * 1.0 + 0.99 * long
        for t in range(1, STEPS):
            L = 1.0 if t < 4 else 0.65
            short, long = 0.3 * L + 0.7 * short, 0.01 * L + 0.99 * long
        assert r0[name]["emotion"]["short"] == pytest.approx(short, abs=1e-12)
        assert r0[name]["emotion"]["long"] == pytest.approx(long, abs=1e-12)

    n0, n1 = _run(tmp_path, sync_loss=False)
    for name in n0:
        assert n0[name]["emotion"]["s"] != n1[name]["emotion"]["s"]
        assert any(not torch.equal(a, b) for a, b in zip(n0[name]["params"], n1[name]["params"]))
