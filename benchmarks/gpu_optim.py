"""optim on a CUDA GPU: one optimizer step on the SDXL rank-8 LoRA set, and path parity.

    python benchmarks/gpu_optim.py --out DIR                          # parts step,parity
    python benchmarks/gpu_optim.py --out DIR --parts step --before /path/to/old/optim
    python benchmarks/gpu_optim.py --smoke --out DIR                  # the script itself, on the CPU

Results go to DIR/gpu_optim.json (rewritten after each part); the last lines printed are
a compact table.

step    one ``step()`` on the parameter set of benchmarks/optim_step.py: SDXL's full-layer
        LoRA at rank 8 (1,576 tensors, 24.59 M parameters, shapes from ``meta_lora_unet``),
        made with ``torch.randn`` on the GPU, the same gradients for every entry. Entries
        run round-robin; CUDA events around each step after a synchronize, and the host
        time of the ``step()`` call itself; medians over the rounds. ``--before DIR``
        adds the Emo optimizers of another copy of the optim package (e.g. main's) as
        "(before)" entries, timed in the same rounds. Also the memory a step allocates
        on top of what it keeps (its temporaries).
parity  EmoSens, EmoAiry, EmoCats (shadow off and on; fp32 and bf16 parameters) on one
        CUDA tensor of every distinct shape of the SDXL rank-32 / conv-rank-8 LoRA: 20
        steps of the foreach path (the default) against the plain one-tensor path
        (``foreach=False``) on CUDA and the plain path on the CPU, with a loss sequence
        that moves the emotion scalar through both shadow bands. ``fused=True`` on CUDA
        must warn once and give exactly the foreach result. (The pass/fail checks of the
        same paths against the oracle are tests/optim/test_optim_cuda.py.)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch

import gpu_common as common
from gpu_common import MB, MIB, Mark, load_optim_from, lora_shapes, run_parts, say, sync

from optim import EmoAiry, EmoCats, EmoSens, state_nbytes  # noqa: E402


# -- optimizer step timing -------------------------------------------------------------

def step_entries(params, lr, args) -> list:
    entries = []

    def add(name, make, emo=False):
        try:
            opt = make()
        except Exception as exc:  # noqa: BLE001
            say(f"skip {name}: {type(exc).__name__}: {exc}")
            return
        entries.append((name, opt, (lambda o=opt: o.step(loss=0.5)) if emo else opt.step))

    add("AdamW(foreach=True)", lambda: torch.optim.AdamW(params, lr=lr, foreach=True))
    add("AdamW(fused=True)", lambda: torch.optim.AdamW(params, lr=lr, fused=True))
    if args.baselines:
        import bitsandbytes as bnb
        from transformers.optimization import Adafactor
        add("bnb AdamW8bit", lambda: bnb.optim.AdamW8bit(params, lr=lr))
        add("transformers Adafactor", lambda: Adafactor(params, lr=lr, scale_parameter=False,
                                                        relative_step=False, warmup_init=False))
        add("bnb Lion(optim_bits=32)", lambda: bnb.optim.Lion(params, lr=lr, optim_bits=32))
    versions = [("", (EmoSens, EmoAiry, EmoCats))]
    if args.before:
        old = load_optim_from(args.before)
        versions.append((" (before)", (old.EmoSens, old.EmoAiry, old.EmoCats)))
    for suffix, classes in versions:
        for cls in classes:
            n = cls.__name__
            add(f"{n}{suffix}", lambda c=cls: c(params, lr=lr), emo=True)
            add(f"{n} shadow on{suffix}", lambda c=cls: c(params, lr=lr, use_shadow=True), emo=True)
            if args.naive:
                add(f"{n} naive per-tensor{suffix}", lambda c=cls: c(params, lr=lr, foreach=False), emo=True)
    return entries


def part_step(args) -> dict:
    shapes = lora_shapes(8, 8, 8, 8)
    gen = torch.Generator(device=common.DEV).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=common.DEV, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=common.DEV, generator=gen) * 1e-3
    entries = step_entries(params, 3e-4, args)
    warnings.simplefilter("ignore")
    temporaries = {}
    for name, opt, step in entries:
        if hasattr(opt, "emotion"):
            opt.step(loss=1.0)  # then 0.5 on every later step: |s| > 0.1, the shadow blends
        for _ in range(3):
            step()
        sync()
        if common.DEV.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            kept = torch.cuda.memory_allocated()
            step()
            sync()
            temporaries[name] = torch.cuda.max_memory_allocated() - kept
    times = {name: [] for name, _, _ in entries}
    host = {name: [] for name, _, _ in entries}
    for _ in range(args.rounds):
        for name, opt, step in entries:
            sync()
            t = time.perf_counter()
            a = Mark()
            step()
            h = time.perf_counter() - t
            b = Mark()
            sync()
            times[name].append(a.ms_to(b))
            host[name].append(1e3 * h)
    base = statistics.median(times["AdamW(foreach=True)"])
    rows = []
    for name, opt, _ in entries:
        med = statistics.median(times[name])
        rows.append({"optimizer": name, "median_ms": med, "min_ms": min(times[name]),
                     "host_median_ms": statistics.median(host[name]), "vs_adamw_foreach": med / base,
                     "state_bytes": state_nbytes(opt), "step_temporaries_bytes": temporaries.get(name),
                     "emotion_s": getattr(getattr(opt, "emotion", None), "s", None)})
    return {"tensors": len(params), "params": sum(p.numel() for p in params), "rounds": args.rounds, "rows": rows}


# -- parity ------------------------------------------------------------------------------

PARITY_STEPS = 20


def parity_losses(n: int) -> list[float]:
    """A falling loss with two spikes and a drop: |s| crosses 0.1 and 0.6, so the shadow
    blend (both bands) and the raised filter threshold all run."""
    out = []
    for k in range(n):
        v = 0.96 ** k + 0.05 * math.sin(1.7 * k)
        out.append(v * (3.0 if k in (6, 7) else 0.2 if k == 13 else 1.0))
    return out


def run_path(cls, shapes, dtype, device, shadow, losses, **kw):
    gen = torch.Generator(device="cpu").manual_seed(1234)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device=device, dtype=dtype))
              for s in shapes]
    p0 = [p.detach().double().cpu().clone() for p in params]
    opt = cls(params, lr=1e-3, use_shadow=shadow, **kw)
    ss = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k, loss in enumerate(losses):
            g = torch.Generator(device="cpu").manual_seed(10_000 + k)
            for p, s in zip(params, shapes):
                base = torch.randn(s, generator=g) * 1e-3  # 20% of the elements tiny: the filter holds some back
                p.grad = torch.where(torch.rand(s, generator=g) < 0.2, base * 1e-3, base).to(device=device, dtype=dtype)
            opt.step(loss=loss)
            ss.append(opt.emotion.s)
    sync()
    final = [p.detach().double().cpu() for p in params]
    state = [(k, st[k].detach().double().cpu()) for st in (opt.state[p] for p in params)
             for k in sorted(k for k, v in st.items() if isinstance(v, torch.Tensor) and v.numel() > 1)]
    return p0, final, state, ss, [str(w.message) for w in caught]


def rel(a_list, b_list) -> float:
    """||a - b|| / ||b|| over lists of tensors."""
    num = sum(float((a - b).norm()) ** 2 for a, b in zip(a_list, b_list))
    den = sum(float(b.norm()) ** 2 for b in b_list)
    return math.sqrt(num / den) if den else (0.0 if num == 0 else float("inf"))


def bf16_ulps(a_list, b_list, p0_list) -> tuple[float, float]:
    """(fraction of elements that differ, largest difference in bf16 ulps at the largest
    magnitude the element had: start or either end)."""
    differ = total = 0
    worst = 0.0
    for a, b, p0 in zip(a_list, b_list, p0_list):
        d = (a - b).abs()
        differ += int((d > 0).sum())
        total += d.numel()
        mag = torch.maximum(torch.maximum(a.abs(), b.abs()), p0.abs())
        ulp = torch.exp2(torch.floor(torch.log2(mag.clamp_min(1e-30))) - 7)
        worst = max(worst, float((d / ulp).max()) if d.numel() else 0.0)
    return differ / max(total, 1), worst


def part_parity(args) -> dict:
    shapes = sorted(set(lora_shapes(32, 16, 8, 4)), key=lambda s: (len(s), s))
    losses = parity_losses(PARITY_STEPS)
    rows = []
    for cls in (EmoSens, EmoAiry, EmoCats):
        for shadow in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                p0, fe, st_fe, s_fe, _ = run_path(cls, shapes, dtype, common.DEV, shadow, losses)
                _, pl, st_pl, s_pl, _ = run_path(cls, shapes, dtype, common.DEV, shadow, losses, foreach=False)
                _, fu, st_fu, _, w_fu = run_path(cls, shapes, dtype, common.DEV, shadow, losses, fused=True)
                _, cpu, _, s_cpu, _ = run_path(cls, shapes, dtype, torch.device("cpu"), shadow, losses, foreach=False)
                d = {name: [a - b for a, b in zip(x, p0)] for name, x in (("fe", fe), ("pl", pl), ("cpu", cpu))}
                row = {"optimizer": cls.__name__, "shadow": shadow, "dtype": str(dtype).replace("torch.", ""),
                       "tensors": len(shapes), "params": sum(math.prod(s) for s in shapes),
                       "s_max_abs": max(abs(x) for x in s_fe),
                       "update_rel_foreach_vs_plain": rel(d["fe"], d["pl"]),
                       "state_rel_foreach_vs_plain": rel([v for _, v in st_fe], [v for _, v in st_pl]),
                       "update_rel_foreach_vs_cpu_plain": rel(d["fe"], d["cpu"]),
                       "emotion_s_equal": s_fe == s_pl == s_cpu,
                       "fused_warnings": len([m for m in w_fu if "fused=True" in m]),
                       "fused_equals_foreach": all(torch.equal(a, b) for a, b in zip(fu, fe))
                       and all(torch.equal(a, b) for (_, a), (_, b) in zip(st_fu, st_fe))}
                if dtype == torch.bfloat16:
                    row["bf16_differ_frac"], row["bf16_max_ulp"] = bf16_ulps(fe, pl, p0)
                rows.append(row)
                say(f"parity {row['optimizer']} shadow={shadow} {row['dtype']}: update rel "
                    f"{row['update_rel_foreach_vs_plain']:.2e}, state rel {row['state_rel_foreach_vs_plain']:.2e}")
    return {"steps": PARITY_STEPS, "losses": losses, "rows": rows}


# -- main --------------------------------------------------------------------------------

def summary(res: dict) -> None:
    say("\n==== gpu_optim summary ====")
    say(f"{res['environment'].get('nvidia_smi')} | torch {res['environment'].get('torch')}")
    if "step" in res:
        o = res["step"]
        say(f"optimizer step, {o['tensors']} tensors / {o['params'] / 1e6:.2f} M params, {o['rounds']} rounds "
            "(median ms | min | host ms | vs AdamW foreach | state MB | step temporaries MiB):")
        for r in o["rows"]:
            tmp = r["step_temporaries_bytes"]
            say(f"  {r['optimizer']:34s} {r['median_ms']:8.2f} {r['min_ms']:8.2f} {r['host_median_ms']:8.2f} "
                f"{r['vs_adamw_foreach']:6.2f}x {r['state_bytes'] / MB:7.1f} "
                f"{'-' if tmp is None else f'{tmp / MIB:7.1f}'}")
    if "parity" in res:
        say("parity (20 steps; rel = ||d_a - d_b|| / ||d_b|| of the total update):")
        for r in res["parity"]["rows"]:
            say(f"  {r['optimizer']:8s} shadow={'on ' if r['shadow'] else 'off'} {r['dtype']:8s} "
                f"foreach/plain {r['update_rel_foreach_vs_plain']:.1e} state {r['state_rel_foreach_vs_plain']:.1e} "
                f"cpu {r['update_rel_foreach_vs_cpu_plain']:.1e} |s|max {r['s_max_abs']:.2f} "
                f"s equal {r['emotion_s_equal']} fused warn {r['fused_warnings']} "
                f"fused==foreach {r['fused_equals_foreach']}"
                + (f" bf16 differ {r['bf16_differ_frac']:.1e} max {r['bf16_max_ulp']:.0f} ulp"
                   if "bf16_max_ulp" in r else ""))
    for part, err in res.get("errors", {}).items():
        say(f"ERROR in {part}: {err}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--parts", default="step,parity")
    ap.add_argument("--rounds", type=int, default=None, help="optimizer-step rounds (20; --smoke: 3)")
    ap.add_argument("--before", default="", help="folder of another optim package to time as '(before)'")
    ap.add_argument("--baselines", action="store_true", help="also bitsandbytes AdamW8bit/Lion and Adafactor")
    ap.add_argument("--naive", action="store_true", help="also the plain per-tensor path (foreach=False)")
    ap.add_argument("--smoke", action="store_true", help="run on the CPU: checks the script, and times the "
                    "CPU paths with --rounds")
    args = ap.parse_args()
    args.rounds = args.rounds or (3 if args.smoke else 20)
    if args.smoke:
        common.use_device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke)")
    run_parts("gpu_optim", {"step": part_step, "parity": part_parity}, args.parts, args.out, args, summary)


if __name__ == "__main__":
    main()
