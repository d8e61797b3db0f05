"""What only a CUDA GPU can show: optim's CUDA paths, and real-size SDXL LoRA training.

    python benchmarks/gpu_sdxl.py --out DIR                        # parity,optim,sdxl,cli
    python benchmarks/gpu_sdxl.py --out DIR --parts parity,optim,sdxl  # about 9 minutes (H100 VM, see RESULTS.md)
    python benchmarks/gpu_sdxl.py --out DIR --parts cli,diag           # about 2.5 minutes
    python benchmarks/gpu_sdxl.py --smoke --out DIR                # the script itself, on the CPU (tiny model)

Parts (all results go to DIR/gpu_results.json, rewritten after each part, and SDXL rows
also to DIR/gpu_sdxl_rows.json after each row; the last lines printed are a compact table):

parity  EmoSens, EmoAiry, EmoCats (shadow off and on; fp32 and bf16 parameters) on
        random CUDA tensors of every distinct shape of the SDXL rank-32 / conv-rank-8
        full-layer LoRA: 20 steps of the foreach path (the default) against the plain
        one-tensor path (``foreach=False``) on CUDA and against the plain path on the CPU,
        with a loss sequence that moves the emotion scalar past the shadow thresholds.
        ``fused=True`` on CUDA must warn once and give exactly the foreach result.
optim   one ``step()`` on the SDXL rank-8 full-layer LoRA parameter set (1,576 tensors,
        24.59 M parameters, shapes from ``meta_lora_unet`` as in benchmarks/optim_step.py),
        materialised with ``torch.randn`` on CUDA; all entries round-robin, CUDA events
        around each step after a synchronize, medians over the rounds.
sdxl    the SDXL 1.0 UNet built from the shipped config with random weights, bf16 base
        weights, fp32 full-layer LoRA rank 32 / alpha 16, conv rank 8 / alpha 4 (the shipped
        presets), 1024 px (latents 128x128), batch 1, bf16 autocast, min-SNR 5, gradient
        clipping at 1.0, the training loop's ``denoising_loss`` on random latents and
        conditioning; per optimizer: warm-up steps, then timed full steps (forward,
        backward, clip, optimizer step), peak CUDA allocated/reserved (peak stats reset per
        optimizer), and the optimizer state held after the last step against
        ``emotrain.vram.plan``. Gradient checkpointing on for every optimizer, then off for
        a few.
diag    (not in the default set) is a step bound by the GPU or by the host: per-launch
        host cost, a bf16 8192^3 matrix product, one SDXL AdamW step under the profiler.
cli     ``emotrain vram --model sdxl --rank 32 --alpha 16 --conv-rank 8 --mixed-precision bf16
        --measure --steps 3 --json``, the shipped command (gradient checkpointing off, its
        default), in its own process: planned vs measured state for all ten rows, CUDA peaks.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from optim import EmoAiry, EmoCats, EmoSens, state_nbytes  # noqa: E402

MB = 1_000_000
MIB = 1 << 20
DEV = torch.device("cuda")  # --smoke: "cpu", to check the script itself on a machine without a GPU


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


class Mark:
    """A point in the stream: a CUDA event on the GPU, a host clock after a sync on the CPU."""

    def __init__(self):
        if DEV.type == "cuda":
            self.ev = torch.cuda.Event(enable_timing=True)
            self.ev.record()
        else:
            self.t = time.perf_counter()

    def ms_to(self, other: "Mark") -> float:
        if DEV.type == "cuda":
            return self.ev.elapsed_time(other.ev)
        return 1e3 * (other.t - self.t)


def cuda_mem(fn_name, default=0):
    return getattr(torch.cuda, fn_name)() if DEV.type == "cuda" else default


def say(*a):
    print(*a, flush=True)


def environment() -> dict:
    import importlib
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if torch.cuda.is_available():
        env.update(device=torch.cuda.get_device_name(0),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   total_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    for name in ("diffusers", "peft", "transformers", "accelerate", "bitsandbytes"):
        try:
            env[name] = importlib.import_module(name).__version__
        except Exception as exc:  # noqa: BLE001
            env[name] = f"unavailable: {type(exc).__name__}: {exc}"
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        env["nvidia_smi"] = f"failed: {exc}"
    return env


def lora_shapes(rank, alpha, conv_rank, conv_alpha):
    from emotrain.sdxl.meta import meta_lora_unet
    unet = meta_lora_unet(model="sdxl", rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha)
    return [tuple(p.shape) for p in unet.parameters() if p.requires_grad]


# -- parity ------------------------------------------------------------------------------

PARITY_STEPS = 20


def parity_losses(n):
    """A decreasing loss with two spikes and a recovery: |s| crosses 0.1 and 0.6, so the
    shadow blend (both bands) and the raised filter threshold all run."""
    out = []
    for k in range(n):
        v = 1.0 * 0.96 ** k + 0.05 * math.sin(1.7 * k)
        if k in (6, 7):
            v *= 3.0
        if k == 13:
            v *= 0.2
        out.append(v)
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
                # gradients of mixed scale, some elements tiny so the filter holds them back
                base = torch.randn(s, generator=g) * 1e-3
                mask = torch.rand(s, generator=g) < 0.2
                p.grad = torch.where(mask, base * 1e-3, base).to(device=device, dtype=dtype)
            opt.step(loss=loss)
            ss.append(opt.emotion.s)
    sync()
    final = [p.detach().double().cpu() for p in params]
    state = []
    for p in params:
        st = opt.state[p]
        for key in sorted(k for k, v in st.items() if isinstance(v, torch.Tensor) and v.numel() > 1):
            state.append((key, st[key].detach().double().cpu()))
    msgs = [str(w.message) for w in caught]
    return p0, final, state, ss, msgs


def rel(a_list, b_list):
    """(global ||a-b||/||b||, worst per-tensor ||a-b||/||b||) over lists of tensors."""
    num = den = 0.0
    worst = 0.0
    for a, b in zip(a_list, b_list):
        d = float((a - b).norm()) ** 2
        n = float(b.norm()) ** 2
        num += d
        den += n
        if n > 0:
            worst = max(worst, math.sqrt(d / n))
        elif d > 0:
            worst = float("inf")
    return (math.sqrt(num / den) if den else (0.0 if num == 0 else float("inf"))), worst


def bf16_ulps(a_list, b_list, p0_list):
    """(fraction of elements that differ, largest difference in units of the last place of
    a bf16 value) over lists of bf16-valued tensors (held as float64). The ulp is taken at
    the largest magnitude the element had (start or either end): a rounding flip made
    while a weight was large stays the same size when the weight later shrinks."""
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
    shapes_all = lora_shapes(32, 16, 8, 4)
    shapes = sorted(set(shapes_all), key=lambda s: (len(s), s))
    losses = parity_losses(PARITY_STEPS)
    results = []
    for cls in (EmoSens, EmoAiry, EmoCats):
        for shadow in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                t0 = time.perf_counter()
                p0, fe, st_fe, s_fe, w_fe = run_path(cls, shapes, dtype, DEV, shadow, losses)
                _, pl, st_pl, s_pl, _ = run_path(cls, shapes, dtype, DEV, shadow, losses, foreach=False)
                # fused=True: on CUDA it must warn and fall back to foreach (on the CPU, --smoke, it is the C loop)
                _, fu, st_fu, s_fu, w_fu = run_path(cls, shapes, dtype, DEV, shadow, losses, fused=True)
                _, cpu, st_cpu, s_cpu, _ = run_path(cls, shapes, dtype, torch.device("cpu"), shadow, losses,
                                                     foreach=False)
                d_fe = [a - b for a, b in zip(fe, p0)]
                d_pl = [a - b for a, b in zip(pl, p0)]
                d_cpu = [a - b for a, b in zip(cpu, p0)]
                fused_warn = [m for m in w_fu if "fused=True" in m]
                row = {
                    "optimizer": cls.__name__, "shadow": shadow, "dtype": str(dtype).replace("torch.", ""),
                    "tensors": len(shapes), "params": sum(math.prod(s) for s in shapes), "steps": PARITY_STEPS,
                    "s_max_abs": max(abs(x) for x in s_fe),
                    "shadow_allocated": any(k == "shadow" for k, _ in st_fe),
                    "params_rel_foreach_vs_plain": rel(fe, pl),
                    "update_rel_foreach_vs_plain": rel(d_fe, d_pl),
                    "state_rel_foreach_vs_plain": rel([v for _, v in st_fe], [v for _, v in st_pl]),
                    "state_keys_equal": [k for k, _ in st_fe] == [k for k, _ in st_pl],
                    "update_rel_cuda_foreach_vs_cpu_plain": rel(d_fe, d_cpu),
                    "emotion_s_equal_foreach_plain_cpu": s_fe == s_pl == s_cpu,
                    "fused_warned": fused_warn[:1],
                    "fused_warnings_count": len(fused_warn),
                    "fused_equals_foreach_exactly": all(torch.equal(a, b) for a, b in zip(fu, fe))
                    and all(torch.equal(a, b) for (_, a), (_, b) in zip(st_fu, st_fe)),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
                if dtype == torch.float32:
                    row["pass"] = (row["update_rel_foreach_vs_plain"][0] <= 1e-6
                                   and row["state_rel_foreach_vs_plain"][0] <= 1e-6)
                    row["criterion"] = "update and state rel <= 1e-6"
                else:
                    # bf16 parameters: the fp32 update is rounded to bf16 on every step, so a
                    # 1e-7 difference in fp32 arithmetic can flip a rounding: count ulps.
                    frac, ulps = bf16_ulps(fe, pl, p0)
                    row["bf16_params_differ_frac"], row["bf16_params_max_ulp"] = frac, ulps
                    row["pass"] = ulps <= 1.0
                    row["criterion"] = "bf16 parameters within 1 ulp"
                results.append(row)
                say(f"parity {row['optimizer']} shadow={shadow} {row['dtype']}: update rel "
                    f"{row['update_rel_foreach_vs_plain'][0]:.2e} (worst tensor {row['update_rel_foreach_vs_plain'][1]:.2e}), "
                    f"state rel {row['state_rel_foreach_vs_plain'][0]:.2e}, vs CPU {row['update_rel_cuda_foreach_vs_cpu_plain'][0]:.2e}, "
                    f"s_max {row['s_max_abs']:.3f}, fused warned {len(fused_warn)}x, "
                    f"fused==foreach {row['fused_equals_foreach_exactly']}")
    return {"shapes": len(shapes), "losses": losses, "rows": results}


# -- optimizer step timing -------------------------------------------------------------

def part_optim(args) -> dict:
    shapes = lora_shapes(8, 8, 8, 8)
    gen = torch.Generator(device=DEV).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=DEV, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=DEV, generator=gen) * 1e-3
    numel = sum(p.numel() for p in params)
    lr = 3e-4
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
    import bitsandbytes as bnb
    from transformers.optimization import Adafactor
    add("bnb AdamW8bit", lambda: bnb.optim.AdamW8bit(params, lr=lr))
    add("transformers Adafactor", lambda: Adafactor(params, lr=lr, scale_parameter=False, relative_step=False,
                                                    warmup_init=False))
    add("bnb Lion(optim_bits=32)", lambda: bnb.optim.Lion(params, lr=lr, optim_bits=32))
    for cls in (EmoSens, EmoAiry, EmoCats):
        n = cls.__name__
        add(f"{n} shadow off", lambda c=cls: c(params, lr=lr), emo=True)
        add(f"{n} shadow on", lambda c=cls: c(params, lr=lr, use_shadow=True), emo=True)
        add(f"{n} naive per-tensor", lambda c=cls: c(params, lr=lr, foreach=False), emo=True)

    warnings.simplefilter("ignore")
    for name, opt, step in entries:
        if hasattr(opt, "emotion"):
            opt.step(loss=1.0)
        for _ in range(3):
            step()
    sync()
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
                     "host_launch_median_ms": statistics.median(host[name]), "vs_adamw_foreach": med / base,
                     "state_bytes": state_nbytes(opt),
                     "shadow_s": getattr(getattr(opt, "emotion", None), "s", None)})
    return {"tensors": len(params), "params": numel, "rounds": args.rounds, "rows": rows}


# -- real-size SDXL ----------------------------------------------------------------------

def part_sdxl(args) -> dict:
    from diffusers import DDPMScheduler

    from emotrain.optimizers import build_optimizer, takes_loss
    from emotrain.sdxl import denoising_loss, load_config
    from emotrain.vram import EMOTION_JUMP, _has_shadow, _random_batch, _real_lora_unet, plan, row_key
    from optim._emotion import shadow_ratio

    rank, alpha, conv_rank, conv_alpha = 32, 16.0, 8, 4.0
    model = args.model
    resolution = 1024 if model == "sdxl" else None  # tiny (--smoke): its own sample size
    batch_size, lr = 1, 3e-4
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    planned = plan(model, rank, alpha, conv_rank, conv_alpha, "all", "both", "bf16", False)
    t_plan = time.perf_counter() - t0
    say(f"plan: {planned['lora_params']:,} LoRA params in {planned['lora_tensors']} tensors ({t_plan:.1f} s)")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = _real_lora_unet(model, rank, alpha, conv_rank, conv_alpha, DEV, dtype)
    sync()
    t_build = time.perf_counter() - t0
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    lora_bytes = sum(p.numel() * p.element_size() for p in params)
    model_alloc = cuda_mem("memory_allocated")
    say(f"UNet built on {DEV} in {t_build:.1f} s: {sum(p.numel() for p in unet.parameters()):,} params, "
        f"{len(params)} LoRA tensors, allocated {model_alloc / MB:,.1f} MB "
        f"(planned UNet base {planned['base_bytes_by_component']['unet'] / MB:,.1f} + LoRA {lora_bytes / MB:,.1f} MB)")
    generator = torch.Generator().manual_seed(0)
    scheduler = DDPMScheduler.from_config(load_config("sdxl_scheduler"))

    def run_row(name, shadow, steps, warmup, checkpointing):
        for p in params:
            p.grad = None
        gc.collect()
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = cuda_mem("memory_allocated")
        opt = build_optimizer(name, params, lr, shadow=shadow)
        losses, ss, ratios, step_s, phases = [], [], [], [], []
        shadow_step = None
        nonfinite = 0
        total = warmup + steps
        for step in range(1, total + 1):
            sync()
            t = time.perf_counter()
            ev = [Mark()]
            batch = _random_batch(unet.config, batch_size, resolution, DEV, generator)
            with torch.autocast("cuda", dtype=dtype):
                loss = denoising_loss(unet, scheduler, batch["latents"], batch["hidden"], batch["pooled"],
                                      batch["time_ids"], generator, min_snr_gamma=5.0)
            loss.backward()
            ev.append(Mark())
            value = loss.item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            ev.append(Mark())
            if takes_loss(opt):
                opt.step(loss=value + (EMOTION_JUMP if shadow and step == 2 else 0.0))
                ss.append(opt.emotion.s)
                ratios.append(shadow_ratio(opt.emotion.s, shadow))
            else:
                opt.step()
            ev.append(Mark())
            opt.zero_grad(set_to_none=True)
            sync()
            dt = time.perf_counter() - t
            losses.append(value)
            nonfinite += not math.isfinite(value)
            if shadow and shadow_step is None and _has_shadow(opt):
                shadow_step = step
            if step > warmup:
                step_s.append(dt)
                phases.append([ev[0].ms_to(ev[1]), ev[1].ms_to(ev[2]), ev[2].ms_to(ev[3])])
        key = row_key(name, shadow)
        measured = state_nbytes(opt)
        peak_alloc = cuda_mem("max_memory_allocated")
        peak_res = cuda_mem("max_memory_reserved")
        steady = cuda_mem("memory_allocated")
        med = statistics.median(step_s)
        row = {
            "key": key, "optimizer": name, "shadow": shadow, "gradient_checkpointing": checkpointing,
            "warmup_steps": warmup, "timed_steps": steps,
            "step_median_s": med, "step_mean_s": statistics.fmean(step_s), "step_min_s": min(step_s),
            "step_max_s": max(step_s), "it_per_s_median": 1 / med, "it_per_s_mean": steps / sum(step_s),
            "fwd_bwd_median_ms": statistics.median(p[0] for p in phases),
            "clip_median_ms": statistics.median(p[1] for p in phases),
            "optimizer_step_median_ms": statistics.median(p[2] for p in phases),
            "planned_state_bytes": planned["optimizers"][key]["state_bytes"], "measured_state_bytes": measured,
            "state_match": measured == planned["optimizers"][key]["state_bytes"],
            "planned_train_step_bytes": planned["optimizers"][key]["training_step_bytes"],
            "allocated_before_optimizer_bytes": before, "allocated_after_bytes": steady,
            "peak_allocated_bytes": peak_alloc, "peak_reserved_bytes": peak_res,
            "shadow_allocated_step": shadow_step, "losses": losses, "nonfinite_losses": nonfinite,
            "emotion_s": ss, "shadow_ratio_timed": ratios[warmup:] if ratios else [],
        }
        row["activations_workspace_bytes"] = peak_alloc - row["planned_train_step_bytes"]
        if hasattr(opt, "defaults"):
            row["optimizer_defaults"] = {k: opt.defaults[k] for k in ("foreach", "fused") if k in opt.defaults}
        del opt
        say(f"{key:16s} ckpt={'on ' if checkpointing else 'off'} {row['it_per_s_median']:.3f} it/s "
            f"(median {1e3 * med:.0f} ms; fwd+bwd {row['fwd_bwd_median_ms']:.0f}, clip {row['clip_median_ms']:.1f}, "
            f"opt {row['optimizer_step_median_ms']:.1f} ms) peak alloc {peak_alloc / MIB:,.0f} MiB "
            f"reserved {peak_res / MIB:,.0f} MiB; state planned {row['planned_state_bytes']:,} measured {measured:,} "
            f"{'match' if row['state_match'] else 'MISMATCH'}; loss {losses[-1]:.3f}")
        return row

    rows = []

    def dump():
        with open(os.path.join(args.out, "gpu_sdxl_rows.json"), "w") as f:
            json.dump(rows, f, indent=1, default=str)

    order = [("emosens", False), ("emosens", True), ("emoairy", False), ("emoairy", True), ("emocats", False),
             ("emocats", True), ("adamw", False), ("adamw8bit", False), ("adafactor", False), ("lion", False)]
    unet.enable_gradient_checkpointing()
    for name, shadow in order:
        try:
            rows.append(run_row(name, shadow, args.steps, args.warmup, True))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"key": row_key(name, shadow), "gradient_checkpointing": True,
                         "error": f"{type(exc).__name__}: {exc}"})
        dump()
    unet.disable_gradient_checkpointing()
    for name, shadow in [(n.strip(), False) for n in args.no_ckpt.split(",") if n.strip()]:
        try:
            rows.append(run_row(name, shadow, args.steps_no_ckpt, args.warmup, False))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"key": row_key(name, shadow), "gradient_checkpointing": False,
                         "error": f"{type(exc).__name__}: {exc}"})
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
        dump()
    return {"model": model, "rank": rank, "alpha": alpha, "conv_rank": conv_rank, "conv_alpha": conv_alpha,
            "resolution": resolution, "batch_size": batch_size, "mixed_precision": "bf16", "lr": lr,
            "lora_params": planned["lora_params"], "lora_tensors": planned["lora_tensors"],
            "plan_seconds": t_plan, "build_seconds": t_build, "model_allocated_bytes": model_alloc,
            "planned_unet_base_bytes": planned["base_bytes_by_component"]["unet"], "lora_bytes": lora_bytes,
            "rows": rows}


# -- where the time goes ------------------------------------------------------------------

def part_diag(args) -> dict:
    """Is a step bound by the GPU or by the host? Per-launch host cost, a bf16 matrix
    product for the card's rate, and one SDXL training step (AdamW) under the profiler:
    the sum of the GPU kernel times against the step's wall time."""
    out = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        out["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                                 if ln.startswith("model name")), None)
    except OSError:
        pass
    x = torch.zeros(1, device=DEV)
    for _ in range(1000):
        x.add_(1)
    sync()
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    host = time.perf_counter() - t
    sync()
    out["tiny_kernel_launch_us"] = 1e6 * (time.perf_counter() - t) / n
    out["tiny_kernel_host_us"] = 1e6 * host / n
    if DEV.type == "cuda":
        a_ = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
        b_ = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
        for _ in range(3):
            a_ @ b_
        sync()
        m0 = Mark()
        for _ in range(10):
            a_ @ b_
        m1 = Mark()
        sync()
        out["bf16_matmul_tflops"] = 10 * 2 * 8192 ** 3 / (m0.ms_to(m1) * 1e-3) / 1e12
        del a_, b_

    from diffusers import DDPMScheduler
    from torch.profiler import ProfilerActivity, profile

    from emotrain.sdxl import denoising_loss, load_config
    from emotrain.vram import _random_batch, _real_lora_unet
    resolution = 1024 if args.model == "sdxl" else None
    torch.manual_seed(0)
    unet = _real_lora_unet(args.model, 32, 16.0, 8, 4.0, DEV, torch.bfloat16)
    unet.train()
    unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4)
    gen = torch.Generator().manual_seed(0)
    sched = DDPMScheduler.from_config(load_config("sdxl_scheduler"))

    def step():
        batch = _random_batch(unet.config, 1, resolution, DEV, gen)
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            loss = denoising_loss(unet, sched, batch["latents"], batch["hidden"], batch["pooled"], batch["time_ids"],
                                  gen, min_snr_gamma=5.0)
        loss.backward()
        loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync()
    walls = []
    for _ in range(3):
        t = time.perf_counter()
        step()
        sync()
        walls.append(time.perf_counter() - t)
    out["adamw_step_wall_s_unprofiled"] = walls
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - t
    # kernels, copies and memsets on the GPU's one stream: their summed duration is GPU busy time
    on_gpu = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    busy_us = sum(e.device_time_total for e in on_gpu)
    out["profiled_step_wall_s"] = wall
    out["gpu_busy_s"] = busy_us * 1e-6
    out["gpu_events"] = len(on_gpu)
    out["gpu_busy_fraction"] = busy_us * 1e-6 / wall if wall else None
    table = prof.key_averages().table(sort_by="self_device_time_total" if DEV.type == "cuda" else "self_cpu_time_total",
                                      row_limit=15)
    out["top"] = table
    say(table)
    say(json.dumps({k: v for k, v in out.items() if k != "top"}))
    del unet, opt, params
    return out


# -- the shipped command -------------------------------------------------------------

def part_cli(args) -> dict:
    """``emotrain vram --measure`` as a user runs it (its own process; checkpointing off,
    the command's default), JSON kept in DIR/vram_measure_cli.json."""
    cmd = [sys.executable, "-m", "emotrain", "vram", "--model", args.model, "--rank", "32", "--alpha", "16",
           "--conv-rank", "8", "--mixed-precision", "bf16", "--measure", "--steps", "3", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cli_timeout,
                          cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    seconds = time.perf_counter() - t0
    with open(os.path.join(args.out, "vram_measure_cli.json"), "w") as f:
        f.write(proc.stdout)
    if proc.returncode:
        say(proc.stderr[-3000:])
        raise RuntimeError(f"exit code {proc.returncode}")
    m = json.loads(proc.stdout)
    rows = []
    for key, r in m["optimizers"].items():
        c = r.get("cuda") or {}
        rows.append({"key": key, "planned_state_bytes": r["planned_state_bytes"],
                     "measured_state_bytes": r["measured_state_bytes"], "match": r["match"],
                     "shadow_allocated_step": r["shadow_allocated_step"],
                     "planned_train_step_bytes": m["planned_train_step_bytes"][key],
                     "peak_allocated_bytes": c.get("peak_allocated_bytes"),
                     "peak_reserved_bytes": c.get("peak_reserved_bytes"), "losses": r["losses"]})
    return {"command": " ".join(["emotrain"] + cmd[3:]), "seconds": seconds, "device": m["device"],
            "gradient_checkpointing": m["gradient_checkpointing"], "resolution": m["resolution"],
            "lora_params": m["lora_params"], "stderr_tail": proc.stderr[-1500:], "rows": rows}


# -- main --------------------------------------------------------------------------------

def summary(res: dict) -> None:
    env = res.get("environment", {})
    say("\n==== summary ====")
    say(f"{env.get('nvidia_smi')} | torch {env.get('torch')} (CUDA {env.get('cuda_runtime')}) | diffusers "
        f"{env.get('diffusers')} peft {env.get('peft')} transformers {env.get('transformers')} accelerate "
        f"{env.get('accelerate')} bitsandbytes {env.get('bitsandbytes')}")
    if "parity" in res and "rows" in res["parity"]:
        say("parity (20 steps; rel = ||d_a - d_b|| / ||d_b|| of the total update):")
        for r in res["parity"]["rows"]:
            say(f"  {r['optimizer']:8s} shadow={'on ' if r['shadow'] else 'off'} {r['dtype']:8s} "
                f"foreach/plain {r['update_rel_foreach_vs_plain'][0]:.1e} state {r['state_rel_foreach_vs_plain'][0]:.1e} "
                f"cpu {r['update_rel_cuda_foreach_vs_cpu_plain'][0]:.1e} |s|max {r['s_max_abs']:.2f} "
                f"fused-warn {r['fused_warnings_count']} fused==foreach {r['fused_equals_foreach_exactly']} "
                + (f"bf16 differ {r['bf16_params_differ_frac']:.1e} max {r['bf16_params_max_ulp']:.0f} ulp "
                   if "bf16_params_max_ulp" in r else "") + f"{'PASS' if r['pass'] else 'FAIL'}")
    if "optim" in res and "rows" in res["optim"]:
        o = res["optim"]
        say(f"optimizer step, {o['tensors']} tensors / {o['params'] / 1e6:.2f} M params, {o['rounds']} rounds:")
        for r in o["rows"]:
            say(f"  {r['optimizer']:26s} {r['median_ms']:8.3f} ms (min {r['min_ms']:.3f}, host {r['host_launch_median_ms']:.2f}) "
                f"{r['vs_adamw_foreach']:5.2f}x  state {r['state_bytes'] / MB:.1f} MB")
    if "sdxl" in res and "rows" in res["sdxl"]:
        say(f"{res['sdxl']['model']} {res['sdxl']['resolution']}px bf16 rank 32/16, conv 8/4, batch 1 "
            f"(it/s = 1/median step; peak allocated / reserved MiB; state planned/measured B):")
        for r in res["sdxl"]["rows"]:
            if "error" in r:
                say(f"  {r['key']} ckpt={r['gradient_checkpointing']}: {r['error']}")
                continue
            say(f"  {r['key']:16s} ckpt={'on ' if r['gradient_checkpointing'] else 'off'} {r['it_per_s_median']:.3f} it/s "
                f"opt {r['optimizer_step_median_ms']:6.1f} ms peak {r['peak_allocated_bytes'] / MIB:8,.0f} / "
                f"{r['peak_reserved_bytes'] / MIB:8,.0f} MiB state {r['planned_state_bytes']:,}/{r['measured_state_bytes']:,} "
                f"{'=' if r['state_match'] else '!='} plan-step {r['planned_train_step_bytes'] / MIB:,.0f} MiB")
    if "cli" in res and "rows" in res["cli"]:
        c = res["cli"]
        say(f"`{c['command']}` ({c['seconds']:.0f} s, {c['device']}, checkpointing {c['gradient_checkpointing']}):")
        for r in c["rows"]:
            pa = r["peak_allocated_bytes"] or 0
            say(f"  {r['key']:16s} state {r['planned_state_bytes']:,}/{r['measured_state_bytes']:,} "
                f"{'match' if r['match'] else 'MISMATCH'} shadow@{r['shadow_allocated_step']} plan-step "
                f"{r['planned_train_step_bytes'] / MIB:,.0f} MiB peak {pa / MIB:,.0f} / "
                f"{(r['peak_reserved_bytes'] or 0) / MIB:,.0f} MiB")
    if "diag" in res and "gpu_busy_s" in res["diag"]:
        d = res["diag"]
        say(f"diag: {d.get('cpu_model')} x{d['cpu_count']}, tiny kernel {d['tiny_kernel_launch_us']:.1f} us/launch, "
            f"bf16 matmul {d.get('bf16_matmul_tflops', 0):.0f} TFLOP/s, AdamW SDXL step wall "
            f"{d['profiled_step_wall_s']:.2f} s (unprofiled {', '.join(f'{w:.2f}' for w in d['adamw_step_wall_s_unprofiled'])}), "
            f"GPU busy {d['gpu_busy_s']:.2f} s = {100 * d['gpu_busy_fraction']:.0f}% in {d['gpu_events']} GPU events")
    for part, err in res.get("errors", {}).items():
        say(f"ERROR in {part}: {err}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--parts", default="parity,optim,sdxl,cli")
    ap.add_argument("--cli-timeout", type=int, default=200, help="seconds for the emotrain vram --measure run")
    ap.add_argument("--rounds", type=int, default=30, help="optimizer-step rounds")
    ap.add_argument("--steps", type=int, default=15, help="timed SDXL steps per optimizer")
    ap.add_argument("--warmup", type=int, default=3, help="untimed SDXL steps per optimizer")
    ap.add_argument("--no-ckpt", default="emoairy,adamw", help="optimizers also run without gradient checkpointing")
    ap.add_argument("--steps-no-ckpt", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="check the script on the CPU (tiny model, few steps)")
    args = ap.parse_args()
    args.model = "sdxl"
    if args.smoke:
        global DEV
        DEV = torch.device("cpu")
        args.model, args.rounds, args.steps, args.warmup, args.steps_no_ckpt = "tiny", 2, 2, 2, 2
    elif not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke)")
    os.makedirs(args.out, exist_ok=True)
    res = {"environment": environment(), "argv": sys.argv, "errors": {}}
    say(json.dumps(res["environment"]))
    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        t0 = time.perf_counter()
        try:
            res[part] = {"parity": part_parity, "optim": part_optim, "sdxl": part_sdxl, "cli": part_cli,
                         "diag": part_diag}[part](args)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            res["errors"][part] = f"{type(exc).__name__}: {exc}"
        res.setdefault("seconds", {})[part] = round(time.perf_counter() - t0, 1)
        say(f"-- part {part} done in {res['seconds'][part]} s")
        with open(os.path.join(args.out, "gpu_results.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        gc.collect()
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    summary(res)


if __name__ == "__main__":
    main()
