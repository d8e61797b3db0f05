"""Time one optimizer step on the parameter set of a real SDXL full-layer LoRA (rank 8).

    python benchmarks/optim_step.py            # 15 interleaved rounds
    python benchmarks/optim_step.py --quick    # 3 rounds

The shapes come from ``emotrain.lora.inject.meta_lora_unet`` (SDXL 1.0 UNet on the meta
device with the full-layer LoRA, conv LoRA included): 1,576 tensors, 24.6 M parameters.
Real CPU tensors of those shapes are allocated once and shared by every optimizer; all
optimizers see the same gradients. Steps are interleaved round-robin (one step of each
optimizer per round) so background load hits every entry alike; the table reports the
median per entry, the ratio to torch AdamW(foreach=True) and the optimizer-state bytes
(``optim.state_nbytes``) after the timed steps.

Shadow "on" entries are fed a loss drop (1.0, then 0.5), which puts |s| near 1, so the
shadow buffer exists and the blend runs on every timed step. The "naive" entries run
each Emo rule one tensor at a time (``foreach=False``: the plain path per parameter, the
way the published code is written).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from optim import EmoAiry, EmoCats, EmoSens, state_nbytes  # noqa: E402


class TorchLion(torch.optim.Optimizer):
    """Minimal foreach Lion, used only if bitsandbytes' Lion cannot run here."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            gs = [p.grad for p in ps]
            ms = []
            for p in ps:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
                ms.append(self.state[p]["exp_avg"])
            b1, b2 = group["betas"]
            if group["weight_decay"]:
                torch._foreach_mul_(ps, 1 - group["lr"] * group["weight_decay"])
            c = torch._foreach_lerp(ms, gs, 1 - b1)
            torch._foreach_sign_(c)
            torch._foreach_add_(ps, c, alpha=-group["lr"])
            torch._foreach_lerp_(ms, gs, 1 - b2)


def sdxl_lora_shapes():
    from emotrain.lora.inject import meta_lora_unet
    unet = meta_lora_unet(model="sdxl", rank=8, alpha=8, conv_rank=8, conv_alpha=8)
    return [tuple(p.shape) for p in unet.parameters() if p.requires_grad]


def build(params, lr):
    """(name, optimizer, step function) for every entry of the table."""
    entries = []

    def add(name, make, emo=False):
        try:
            opt = make()
        except Exception as exc:  # a baseline that cannot run on this machine
            print(f"skip {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return
        if emo:
            entries.append((name, opt, lambda o=opt: o.step(loss=0.5)))
        else:
            entries.append((name, opt, opt.step))

    add("AdamW(foreach=True)", lambda: torch.optim.AdamW(params, lr=lr, foreach=True))
    add("AdamW(fused=True)", lambda: torch.optim.AdamW(params, lr=lr, fused=True))
    import bitsandbytes as bnb
    add("bnb AdamW8bit", lambda: bnb.optim.AdamW8bit(params, lr=lr))
    from transformers.optimization import Adafactor
    add("transformers Adafactor", lambda: Adafactor(params, lr=lr, scale_parameter=False,
                                                    relative_step=False, warmup_init=False))
    n = len(entries)
    add("bnb Lion(optim_bits=32)", lambda: bnb.optim.Lion(params, lr=lr, optim_bits=32))
    if len(entries) == n:
        add("torch Lion (foreach, minimal)", lambda: TorchLion(params, lr=lr))
    for cls in (EmoSens, EmoAiry, EmoCats):
        n = cls.__name__
        add(f"{n} shadow off", lambda c=cls: c(params, lr=lr), emo=True)
        add(f"{n} shadow on", lambda c=cls: c(params, lr=lr, use_shadow=True), emo=True)
        add(f"{n} fused", lambda c=cls: c(params, lr=lr, fused=True), emo=True)
        add(f"{n} fused shadow on", lambda c=cls: c(params, lr=lr, fused=True, use_shadow=True),
            emo=True)
        add(f"{n} naive per-tensor", lambda c=cls: c(params, lr=lr, foreach=False), emo=True)
    return entries


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds instead of 15")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--only", default="", help="comma-separated substrings of entry names")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 15)

    shapes = sdxl_lora_shapes()
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    numel = sum(p.numel() for p in params)
    entries = build(params, lr=3e-4)
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        entries = [e for e in entries if e[0] == "AdamW(foreach=True)" or any(k in e[0] for k in keys)]

    warnings.simplefilter("ignore")
    for name, opt, step in entries:  # warm-up: allocate state, fire the shadow
        if hasattr(opt, "emotion"):
            opt.step(loss=1.0)
        for _ in range(2):
            step()
    times = {name: [] for name, _, _ in entries}
    load0 = os.getloadavg()
    for _ in range(rounds):
        for name, opt, step in entries:
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    load1 = os.getloadavg()

    base = statistics.median(times["AdamW(foreach=True)"])
    print(f"# {len(params)} tensors, {numel / 1e6:.2f} M parameters (SDXL full-layer LoRA, rank 8)")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"{rounds} rounds, load average {load0[0]:.1f} -> {load1[0]:.1f}")
    print(f"| optimizer | median step (ms) | min (ms) | vs AdamW(foreach) | state (MB) |")
    print(f"|---|---:|---:|---:|---:|")
    med = {}
    for name, opt, _ in entries:
        med[name] = statistics.median(times[name])
        print(f"| {name} | {1e3 * med[name]:.1f} | {1e3 * min(times[name]):.1f} | "
              f"{med[name] / base:.2f}x | {state_nbytes(opt) / 1e6:.1f} |")

    def ratio(a, b):
        return med[a] / med[b] if a in med and b in med else float("nan")

    print()
    print("targets:")
    checks = [("EmoSens default <= 1.15x AdamW(foreach)", ratio("EmoSens shadow off", "AdamW(foreach=True)"), 1.15),
              ("EmoAiry default <= 1.0x AdamW(foreach)", ratio("EmoAiry shadow off", "AdamW(foreach=True)"), 1.0),
              ("EmoCats default <= 1.0x AdamW(foreach)", ratio("EmoCats shadow off", "AdamW(foreach=True)"), 1.0)]
    for n in ("EmoSens", "EmoAiry", "EmoCats"):
        checks.append((f"{n} fused <= 1.5x AdamW(fused)", ratio(f"{n} fused", "AdamW(fused=True)"), 1.5))
        checks.append((f"{n} fused >= 3x faster than naive (fused/naive <= 0.333)",
                       ratio(f"{n} fused", f"{n} naive per-tensor"), 1 / 3))
        checks.append((f"{n} default faster than naive (default/naive < 1)",
                       ratio(f"{n} shadow off", f"{n} naive per-tensor"), 1.0))
    for label, value, limit in checks:
        verdict = "met" if value <= limit else "MISSED"
        print(f"- {label}: {value:.2f} -> {verdict}")


if __name__ == "__main__":
    main()
