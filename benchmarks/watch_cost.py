"""What watching a run costs (issue 11): the tiny model on the CPU, one process.

    python benchmarks/watch_cost.py              # 200 steps, 2 interleaved rounds
    python benchmarks/watch_cost.py --quick      # 20 steps, 1 round
    python benchmarks/watch_cost.py --steps 1000 --rounds 1 --modes watched,bare

Three settings of the same run (demo data, 64 px, batch 2, rank 4, EmoAiry):

- bare: ``--log-with none --log-every`` past the end: no trackers, no costly figures
  (metrics.jsonl and report.html are still written: every run writes them);
- logging: the default, TensorBoard event files with every step's scalars and, every 10
  steps, gradient norm, the filter count, it/s and memory;
- watched: logging plus validation every 10% of the run (a 2-image --val-data folder,
  4 timesteps each: at step 0 and 10 more times) and 2 sample prompts every 25% (64 px,
  25 steps: at step 0 and 4 more times).

Two kinds of numbers. End to end: each setting's wall time (median over rounds,
interleaved so background load hits each alike). On a shared machine these move by
several percent from run to run, more than logging costs; so, second, the watch code is
timed where it runs, in the watched run: the time the steps took (metrics.jsonl), the
logging work per step (``Watch.before_update`` and ``after_step`` less validation and
samples), each validation pass and each sample image. Those timings, divided by the
steps' time, are the overheads the targets are about.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SPENT: dict[str, list[float]] = defaultdict(list)


def settings(steps: int, val_dir: str) -> dict[str, list[str]]:
    return {
        "bare": ["--log-with", "none", "--log-every", str(steps + 1)],
        "logging": ["--log-with", "tensorboard"],
        "watched": ["--log-with", "tensorboard", "--val-data", val_dir, "--val-every", str(max(1, steps // 10)),
                    "--sample-prompt", "a red circle on a white background", "--sample-prompt", "a blue square",
                    "--sample-every", str(max(1, steps // 4))],
    }


def instrument() -> None:
    """Time the watch code where it runs (each call's seconds into SPENT)."""
    import emotrain.watch.samples as samples
    import emotrain.watch.session as session
    import emotrain.watch.validation as validation

    def timed(owner, name, key):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                SPENT[key].append(time.perf_counter() - started)
        setattr(owner, name, wrapper)

    timed(session.Watch, "before_update", "before_update")
    timed(session.Watch, "after_step", "after_step")
    timed(validation.Validation, "loss", "validation")
    timed(session.Watch, "begin", "begin")
    timed(samples, "generate", "samples")


def one_run(folder: Path, steps: int, extra: list[str]) -> dict:
    from typer.testing import CliRunner

    from emotrain.cli import app

    SPENT.clear()
    args = ["sdxl-lora", "--model", "tiny", "--data", "demo", "--resolution", "64", "--batch-size", "2", "--rank", "4",
            "--optim", "emoairy", "--lr", "1e-3", "--seed", "0", "--steps", str(steps), "--output", str(folder), *extra]
    started = time.perf_counter()
    result = CliRunner().invoke(app, args)
    total = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    run = json.loads((folder / "run.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if "train/loss" in r]
    return {"total": total, "loop": run["seconds"], "train": times[-1],
            "step": statistics.median(b - a for a, b in zip(times, times[1:])),
            "spent": {k: list(v) for k, v in SPENT.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--modes", default="bare,logging,watched", help="which settings, in this order")
    args = parser.parse_args()
    steps = args.steps or (20 if args.quick else 200)
    rounds = args.rounds or (1 if args.quick else 2)

    import torch

    from emotrain.dataset.demo import demo_folder

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    instrument()
    tmp = Path(tempfile.mkdtemp(prefix="watch-cost-"))
    val_dir = str(demo_folder(count=2, size=64, seed=7))
    every = settings(steps, val_dir)
    modes = {m: every[m] for m in args.modes.split(",")}
    one_run(tmp / "warm-up", 2, every["watched"])  # imports, tiny model and demo data built once
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode, extra in modes.items():
            runs[mode].append(one_run(tmp / f"{mode}-{r}", steps, extra))
            print(f"round {r + 1} {mode}: " + json.dumps({k: v for k, v in runs[mode][-1].items() if k != "spent"}),
                  file=sys.stderr)

    def med(mode, key):
        return statistics.median(t[key] for t in runs[mode])

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"{steps} steps, median of {rounds} rounds\n")
    print("End to end:\n")
    print("| setting | train() wall s | vs bare | training loop s | vs bare | steps alone s | median step s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in modes:
        print(f"| {mode} | {med(mode, 'total'):.1f} | {med(mode, 'total') / med('bare', 'total') - 1:+.1%} | "
              f"{med(mode, 'loop'):.1f} | {med(mode, 'loop') / med('bare', 'loop') - 1:+.1%} | "
              f"{med(mode, 'train'):.1f} | {med(mode, 'step'):.3f} |")

    print("\nTimed where it runs (watched run; per round, then the median):\n")
    print("| | seconds | calls | share of the steps' time |")
    print("|---|---:|---:|---:|")
    rows = defaultdict(list)
    for run in runs["watched"]:
        spent, train = run["spent"], run["train"]
        val, samples = sum(spent.get("validation", [])), sum(spent.get("samples", []))
        # begin (trackers started, step 0's validation and samples) + every step's calls
        watch = sum(sum(spent.get(k, [])) for k in ("begin", "before_update", "after_step"))
        logging = watch - val - samples
        rows["logging (per-step scalars, every 10 steps the costly figures)"].append((logging, steps, logging / train))
        rows["validation passes (2 images x 4 timesteps)"].append((val, len(spent.get("validation", [])), val / train))
        rows["sample rounds (2 prompts, 64 px, 25 steps)"].append((samples, len(spent.get("samples", [])), samples / train))
        rows["validation + samples"].append((val + samples, None, (val + samples) / train))
    for name, values in rows.items():
        secs = statistics.median(v[0] for v in values)
        calls = values[0][1]
        share = statistics.median(v[2] for v in values)
        print(f"| {name} | {secs:.2f} | {calls if calls is not None else ''} | {share:.1%} |")
    step = med("watched", "step")
    per_val = statistics.median(s for run in runs["watched"] for s in run["spent"].get("validation", []))
    per_sample = statistics.median(s for run in runs["watched"] for s in run["spent"].get("samples", [])) / 2
    print(f"\nOne training step {step:.3f} s; one validation pass {per_val:.2f} s ({per_val / step:.1f} steps); "
          f"one 25-step sample {per_sample:.2f} s ({per_sample / step:.1f} steps).")


if __name__ == "__main__":
    main()
