"""What watching a run costs (issue 11): the tiny model on the CPU, one process.

    python benchmarks/watch_cost.py              # 100 steps, 3 interleaved rounds
    python benchmarks/watch_cost.py --quick      # 20 steps, 1 round

Three settings of the same run (demo data, 64 px, batch 2, rank 4, EmoAiry):

- bare: ``--log-with none --log-every`` past the end: no trackers, no costly figures
  (metrics.jsonl and report.html are still written: every run writes them);
- logging: the default, TensorBoard event files with every step's scalars and, every 10
  steps, gradient norm, the filter count, it/s and memory;
- watched: logging plus validation every 10% of the run (a 2-image --val-data folder,
  4 timesteps each, at step 0 and 10 more times) and 2 sample prompts every 25% (64 px,
  25 steps, at step 0 and 4 more times).

Rounds are interleaved (bare, logging, watched, bare, ...) so background load hits each
alike; the table gives each setting's median wall time of ``train()`` (model load and
caching included, as a user waits for it), of its training loop (run.json's seconds:
from the first step to the last; the step-0 validation and samples come before it), and
the time the optimizer steps themselves took (metrics.jsonl's training time, which
leaves out validation and sampling).
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


def settings(steps: int, val_dir: str) -> dict[str, list[str]]:
    return {
        "bare": ["--log-with", "none", "--log-every", str(steps + 1)],
        "logging": ["--log-with", "tensorboard"],
        "watched": ["--log-with", "tensorboard", "--val-data", val_dir, "--val-every", str(max(1, steps // 10)),
                    "--sample-prompt", "a red circle on a white background", "--sample-prompt", "a blue square",
                    "--sample-every", str(max(1, steps // 4))],
    }


def one_run(folder: Path, steps: int, extra: list[str]) -> dict:
    from emotrain.cli import app
    from typer.testing import CliRunner

    args = ["sdxl-lora", "--model", "tiny", "--data", "demo", "--resolution", "64", "--batch-size", "2", "--rank", "4",
            "--optim", "emoairy", "--lr", "1e-3", "--seed", "0", "--steps", str(steps), "--output", str(folder), *extra]
    started = time.perf_counter()
    result = CliRunner().invoke(app, args)
    total = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    run = json.loads((folder / "run.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"total": total, "loop": run["seconds"], "train": rows[-1]["time"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    steps = args.steps or (20 if args.quick else 100)
    rounds = args.rounds or (1 if args.quick else 3)

    import torch

    from emotrain.data import demo_folder

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    tmp = Path(tempfile.mkdtemp(prefix="watch-cost-"))
    val_dir = str(demo_folder(count=2, size=64, seed=7))
    modes = settings(steps, val_dir)
    one_run(tmp / "warm-up", 2, modes["watched"])  # imports, tiny model and demo data built once
    times: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode, extra in modes.items():
            times[mode].append(one_run(tmp / f"{mode}-{r}", steps, extra))
            print(f"round {r + 1} {mode}: {times[mode][-1]}", file=sys.stderr)

    def med(mode, key):
        return statistics.median(t[key] for t in times[mode])

    base_total, base_loop = med("bare", "total"), med("bare", "loop")
    log_total, log_loop = med("logging", "total"), med("logging", "loop")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"{steps} steps, median of {rounds}\n")
    print("| setting | train() wall s | vs bare | vs logging | training loop s | vs bare | vs logging | "
          "steps alone s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in modes:
        total, loop = med(mode, "total"), med(mode, "loop")
        print(f"| {mode} | {total:.1f} | {total / base_total - 1:+.1%} | {total / log_total - 1:+.1%} | {loop:.1f} | "
              f"{loop / base_loop - 1:+.1%} | {loop / log_loop - 1:+.1%} | {med(mode, 'train'):.1f} |")


if __name__ == "__main__":
    main()
