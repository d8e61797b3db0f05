"""What the training options that add work to every step cost (issue 16): the tiny model's
training step with and without each, in one process.

    python benchmarks/option_cost.py                     # CPU, 64 px, batch 2, rank 4
    python benchmarks/option_cost.py --rounds 3 --steps 3 # quicker
    python benchmarks/option_cost.py --device cuda --mixed-precision bf16

A step is what the loop does per optimizer step: the objective's draws and loss
(emotrain/loss.py), the backward, an EmoAiry step, and with --scale-weight-norms the
max-norm pass (emotrain/lora/maxnorm.py); with a dropout option the step runs inside the
run's dropout window (emotrain/lora/dropout.py) as training does. Each setting has its own
copy of the model (same seed); the settings take turns, ``--steps`` steps each per round,
for ``--rounds`` rounds after one warm-up round, so background load hits them alike. The
figure per setting is the median over rounds of the seconds per step; the cost is its
difference to the plain step's median, as a share of the plain step; the paired cost is
the median of each round's difference to that round's plain step (load that changes
between rounds cancels), as the same share. "plain again" is the plain step on a second copy of the model: its
cost is the method's own error (copies of the model sit differently in memory and caches).

On the CPU the clock is the thread's CPU time (``time.thread_time``, one thread): on a
shared machine the wall time of a step moved by 2x between rounds (other processes
taking the cores), far more than any option costs; CPU time counts only this process's
work. On CUDA it is the wall time between synchronisations. The max-norm pass is also
timed on its own (it runs after the optimizer step, outside forward and backward).

Beside the times, a figure no load moves: the aten operations one step dispatches
(``step_ops.OpCounter``, views left out), counted once per setting after the timing. The
tiny model's step is made of small operations, so an option's share of them is close to
its share of the time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SETTINGS = {
    "plain": {},
    "plain again": {},  # the same step on its own copy: what the method reads where nothing differs
    "network dropout 0.1": {"network_dropout": 0.1},
    "rank dropout 0.1": {"rank_dropout": 0.1},
    "module dropout 0.1": {"module_dropout": 0.1},
    "multires noise 6 x 0.3": {"multires_noise_iterations": 6, "multires_noise_discount": 0.3},
    "scale weight norms 1": {"scale_weight_norms": 1.0},
}


class Setting:
    def __init__(self, changes: dict, args):
        import torch
        from diffusers import DDPMScheduler

        from emotrain import sdxl
        from emotrain.config import TrainConfig
        from emotrain.lora import dropout, maxnorm
        from emotrain.lora.inject import lora_config_for_run, random_lora_unet
        from emotrain.loss import Objective
        from emotrain.optimizers import build_optimizer
        from emotrain.precision import weight_dtype
        from emotrain.vram.measure import _random_batch

        self.device = torch.device(args.device)
        self.cfg = TrainConfig(model="tiny", rank=args.rank, resolution=args.resolution, batch_size=args.batch_size,
                               mixed_precision=args.mixed_precision, seed=0, **changes)
        dtype = weight_dtype(self.cfg.mixed_precision)
        torch.manual_seed(0)
        self.unet = random_lora_unet("tiny", lora_config_for_run(self.cfg), self.device, dtype)
        self.unet.train()
        trained = [self.unet]
        self.dropout = dropout.install(trained, self.cfg.network_dropout, self.cfg.rank_dropout,
                                       self.cfg.module_dropout)
        self.factors = maxnorm.lora_factors(trained) if self.cfg.scale_weight_norms else None
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = build_optimizer("emoairy", self.params, 1e-4)
        self.objective = Objective.of(self.cfg)
        self.scheduler = DDPMScheduler.from_config(sdxl.load_config("sdxl_scheduler"))
        self.noise = torch.Generator().manual_seed(0)
        self.batch = _random_batch(self.unet.config, self.cfg.batch_size, self.cfg.resolution, self.device,
                                   torch.Generator().manual_seed(1))
        self.autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(self, clock) -> float:
        """One step; -> the max-norm pass's seconds (0 without it)."""
        b = self.batch
        window = self.dropout.micro_batch(self.noise) if self.dropout else nullcontext()
        with window:
            with self.autocast:
                loss = self.objective.loss(self.unet, self.scheduler, b["latents"], b["hidden"], b["pooled"],
                                           b["time_ids"], self.noise)
            loss.backward()
        self.optimizer.step(loss=loss.item())  # the loop's host sync: the loss is read every step
        spent = 0.0
        if self.factors:
            from emotrain.lora import maxnorm
            start = clock()
            maxnorm.apply(self.factors, self.cfg.scale_weight_norms)
            spent = clock() - start
        self.optimizer.zero_grad(set_to_none=True)
        return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="steps per setting per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    settings = {name: Setting(changes, args) for name, changes in SETTINGS.items()}
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def clock() -> float:
        sync()
        return time.perf_counter() if cuda else time.thread_time()

    times: dict[str, list[float]] = {name: [] for name in settings}
    max_norm_pass: list[float] = []
    for round_ in range(args.rounds + 1):  # round 0 warms up (allocator, caches) and is not counted
        order = list(settings) if round_ % 2 else list(reversed(settings))  # alternating order
        for name in order:
            setting = settings[name]
            start, passes = clock(), 0.0
            for _ in range(args.steps):
                passes += setting.step(clock)
            if round_:
                times[name].append((clock() - start) / args.steps)
                if setting.factors:
                    max_norm_pass.append(passes / args.steps)
    from step_ops import OpCounter

    ops = {}
    for name, setting in settings.items():
        with OpCounter() as counter:
            setting.step(clock)
        ops[name] = counter.summary()["non_view"]
    plain = statistics.median(times["plain"])
    print(f"device {args.device}, {args.mixed_precision}, {args.resolution} px, batch {args.batch_size}, rank "
          f"{args.rank}; {args.rounds} rounds x {args.steps} steps per setting; median "
          f"{'wall' if cuda else 'CPU'} time per step (min-max of rounds)")
    print("| setting | s/step | range | cost vs plain | paired cost | ops per step (non-view) |")
    print("|---|---|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        cost = "-" if name == "plain" else f"{100 * (median - plain) / plain:+.1f}%"
        # the same round's plain step beside it: load that drifts between rounds cancels
        paired = "-" if name == "plain" else \
            f"{100 * statistics.median(v - p for v, p in zip(values, times['plain'])) / plain:+.1f}%"
        extra = "" if name == "plain" else f" ({100 * (ops[name] - ops['plain']) / ops['plain']:+.1f}%)"
        print(f"| {name} | {median * 1e3:.1f} ms | {min(values) * 1e3:.1f}-{max(values) * 1e3:.1f} ms | {cost} | "
              f"{paired} | {ops[name]}{extra} |")
    if max_norm_pass:
        alone = statistics.median(max_norm_pass)
        print(f"max-norm pass alone: {alone * 1e3:.2f} ms per step = {100 * alone / plain:.1f}% of the plain step")


if __name__ == "__main__":
    main()
