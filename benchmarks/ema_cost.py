"""What the EMA of the LoRA costs per step (issue 16): the tiny model, one process.

    python benchmarks/ema_cost.py                  # 100 steps, 3 alternating rounds
    python benchmarks/ema_cost.py --steps 40 --rounds 2

The same run (demo data, 64 px, batch 2, rank 4, EmoAiry, no logging) with and without
``--ema-decay 0.999``, in one process, alternating plain/EMA so background load hits both
alike. Two numbers: end to end, the median step time of each run (metrics.jsonl), median
over rounds; and, since a shared machine's noise is larger than the EMA, the EMA update
itself timed where it runs (``LoraEma.update``, every call) against the steps' time of
the same run. ``ema_cost()`` returns both; ``main()`` prints them as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

UPDATES: list[float] = []
MODES = {"plain": [], "ema": ["--ema-decay", "0.999"]}


def instrument() -> None:
    """Time every EMA update where the loop calls it."""
    from emotrain.run.ema import LoraEma

    real = LoraEma.update

    def update(self):
        started = time.perf_counter()
        try:
            return real(self)
        finally:
            UPDATES.append(time.perf_counter() - started)
    LoraEma.update = update


def one_run(folder: Path, steps: int, extra: list[str]) -> dict:
    from typer.testing import CliRunner

    from emotrain.cli import app

    UPDATES.clear()
    args = ["sdxl-lora", "--model", "tiny", "--data", "demo", "--resolution", "64", "--batch-size", "2", "--rank", "4",
            "--optim", "emoairy", "--lr", "1e-3", "--seed", "0", "--steps", str(steps), "--log-with", "none",
            "--log-every", str(steps + 1), "--output", str(folder), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if "train/loss" in r]
    return {"step": statistics.median(b - a for a, b in zip(times, times[1:])), "train": times[-1],
            "updates": list(UPDATES)}


def ema_cost(steps: int = 100, rounds: int = 3) -> dict:
    """-> median step seconds per mode, the EMA update's median seconds and its share of
    the EMA runs' steps (median over rounds)."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    instrument()
    tmp = Path(tempfile.mkdtemp(prefix="ema-cost-"))
    one_run(tmp / "warm-up", 2, MODES["ema"])  # imports, tiny model and demo data built once
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode, extra in (MODES.items() if r % 2 == 0 else reversed(MODES.items())):
            runs[mode].append(one_run(tmp / f"{mode}-{r}", steps, extra))
            print(f"round {r + 1} {mode}: step {runs[mode][-1]['step']:.4f} s", file=sys.stderr)
    step = {m: statistics.median(run["step"] for run in runs[m]) for m in MODES}
    update = statistics.median(u for run in runs["ema"] for u in run["updates"])
    share = statistics.median(sum(run["updates"]) / run["train"] for run in runs["ema"])
    return {"steps": steps, "rounds": rounds, "step_seconds": step, "update_seconds": update,
            "update_share_of_steps": share, "end_to_end": step["ema"] / step["plain"] - 1,
            "torch": torch.__version__, "cpus": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    r = ema_cost(args.steps, args.rounds)
    print(f"torch {r['torch']}, {r['cpus']} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"{r['steps']} steps, median of {r['rounds']} alternating rounds\n")
    print("| | median step s | vs plain |")
    print("|---|---:|---:|")
    print(f"| plain | {r['step_seconds']['plain']:.4f} | |")
    print(f"| --ema-decay 0.999 | {r['step_seconds']['ema']:.4f} | {r['end_to_end']:+.1%} |")
    print(f"\nThe EMA update timed where it runs: {r['update_seconds'] * 1e6:.0f} us per step, "
          f"{r['update_share_of_steps']:.2%} of the steps' time.")


if __name__ == "__main__":
    main()
