"""Real-size SDXL LoRA training on a CUDA GPU: step time per optimizer, memory against the plan.

    python benchmarks/gpu_sdxl.py --out DIR                      # parts sdxl,cli
    python benchmarks/gpu_sdxl.py --out DIR --parts sdxl --optims emosens,emoairy,emocats,adamw --steps 6
    python benchmarks/gpu_sdxl.py --out DIR --parts diag         # is a step bound by the GPU or the host?
    python benchmarks/gpu_sdxl.py --smoke --out DIR              # the script itself, on the CPU (tiny model)

Results go to DIR/gpu_sdxl.json (rewritten after each part and each SDXL row); the last
lines printed are a compact table.

sdxl  the run ``emotrain.config.TrainConfig(model="sdxl", rank=32, alpha=16, conv_rank=8,
      conv_alpha=4, mixed_precision="bf16", gradient_checkpointing=True, resolution=1024,
      batch_size=1)`` describes (the shipped presets' LoRA): SDXL 1.0's UNet with random
      weights (``emotrain.lora.inject.random_lora_unet`` with ``lora_config_for_run(cfg)``), bf16
      base, fp32 LoRA, bf16 autocast, the training loop's ``Objective.loss`` with min-SNR 5
      on random latents and conditioning, gradient clipping at 1.0. Per optimizer:
      warm-up steps, then timed steps (batch, forward, backward, ``loss.item()``, clip,
      optimizer step; phases timed with CUDA events), peak CUDA memory (stats reset per
      optimizer), and the state held after the last step against ``emotrain.vram.plan``.
      Shadow rows are told a loss that jumps on step 2, as ``emotrain vram --measure`` does.
cli   the shipped command in its own process: ``emotrain vram --model sdxl --rank 32
      --alpha 16 --conv-rank 8 --conv-alpha 4 --mixed-precision bf16 --measure
      --measure-steps 3 --json`` (checkpointing off, its default).
diag  (not in the default set) per-launch host cost, a bf16 8192^3 matrix product, and one
      AdamW step under the profiler: GPU busy time against the step's wall time.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

import torch

import gpu_common as common
from gpu_common import MIB, ROOT, Mark, cuda_mem, run_parts, say, sync

from optim import state_nbytes  # noqa: E402


def run_config(model: str):
    from emotrain.config import TrainConfig
    if model == "tiny":  # --smoke
        return TrainConfig(model="tiny", rank=8, alpha=8, conv_rank=4, conv_alpha=4, mixed_precision="no",
                           gradient_checkpointing=True, resolution=64, batch_size=1)
    return TrainConfig(model="sdxl", rank=32, alpha=16, conv_rank=8, conv_alpha=4, mixed_precision="bf16",
                       gradient_checkpointing=True, resolution=1024, batch_size=1)


def random_batch(config, batch_size: int, resolution: int, generator) -> dict:
    side = resolution // 8
    time_dim = 6 * config.addition_time_embed_dim
    shapes = {"latents": (batch_size, config.in_channels, side, side),
              "hidden": (batch_size, 77, config.cross_attention_dim),
              "pooled": (batch_size, config.projection_class_embeddings_input_dim - time_dim)}
    batch = {k: torch.randn(s, generator=generator).to(common.DEV) for k, s in shapes.items()}
    batch["time_ids"] = torch.tensor([resolution, resolution, 0, 0, resolution, resolution],
                                     dtype=torch.float32).repeat(batch_size, 1).to(common.DEV)
    return batch


def build_unet(cfg):
    from emotrain.lora.inject import lora_config_for_run, random_lora_unet
    from emotrain.precision import weight_dtype
    torch.manual_seed(cfg.seed)
    unet = random_lora_unet(cfg.model, lora_config_for_run(cfg), common.DEV, weight_dtype(cfg.mixed_precision))
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def has_shadow(opt) -> bool:
    return any(isinstance(st, dict) and "shadow" in st for st in opt.state.values())


# -- real-size training steps ---------------------------------------------------------

def part_sdxl(args) -> dict:
    from diffusers import DDPMScheduler

    from emotrain import sdxl, vram
    from emotrain.loss import Objective
    from emotrain.optimizers import build_optimizer, takes_loss
    from emotrain.precision import weight_dtype

    cfg = run_config(args.model)
    rows_wanted = vram.plan_rows(vram.parse_optims(args.optims), vram.shadow_settings(args.shadow))
    t0 = time.perf_counter()
    planned = vram.plan(cfg, args.optims, args.shadow)
    say(f"plan: {planned['lora_params']:,} LoRA params in {planned['lora_tensors']} tensors "
        f"({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    unet = build_unet(cfg)
    sync()
    t_build = time.perf_counter() - t0
    params = [p for p in unet.parameters() if p.requires_grad]
    model_alloc = cuda_mem("memory_allocated")
    say(f"UNet built on {common.DEV} in {t_build:.1f} s: {sum(p.numel() for p in unet.parameters()):,} params, "
        f"{len(params)} LoRA tensors, allocated {model_alloc / MIB:,.1f} MiB")
    dtype = weight_dtype(cfg.mixed_precision)
    generator = torch.Generator().manual_seed(cfg.seed)
    scheduler = DDPMScheduler.from_config(sdxl.load_config("sdxl_scheduler"))
    autocast = torch.autocast(common.DEV.type, dtype=dtype, enabled=dtype != torch.float32)

    def run_row(name, shadow):
        for p in params:
            p.grad = None
        gc.collect()
        if common.DEV.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        opt = build_optimizer(name, params, cfg.lr, shadow=shadow)
        losses, step_s, phases, shadow_step = [], [], [], None
        for step in range(1, args.warmup + args.steps + 1):
            sync()
            t = time.perf_counter()
            ev = [Mark()]
            batch = random_batch(unet.config, cfg.batch_size, cfg.resolution, generator)
            with autocast:
                loss = Objective(min_snr_gamma=5.0).loss(unet, scheduler, batch["latents"], batch["hidden"],
                                                         batch["pooled"], batch["time_ids"], generator)
            loss.backward()
            ev.append(Mark())
            value = loss.item()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            ev.append(Mark())
            if takes_loss(opt):
                opt.step(loss=value + (vram.EMOTION_JUMP if shadow and step == 2 else 0.0))
            else:
                opt.step()
            ev.append(Mark())
            opt.zero_grad(set_to_none=True)
            sync()
            losses.append(value)
            if shadow and shadow_step is None and has_shadow(opt):
                shadow_step = step
            if step > args.warmup:
                step_s.append(time.perf_counter() - t)
                phases.append([ev[0].ms_to(ev[1]), ev[1].ms_to(ev[2]), ev[2].ms_to(ev[3])])
        key = vram.row_key(name, shadow)
        plan_row = planned["optimizers"][key]
        med = statistics.median(step_s)
        row = {"key": key, "optimizer": name, "shadow": shadow, "warmup_steps": args.warmup, "timed_steps": args.steps,
               "step_median_s": med, "step_min_s": min(step_s), "step_max_s": max(step_s), "it_per_s": 1 / med,
               "fwd_bwd_median_ms": statistics.median(p[0] for p in phases),
               "clip_median_ms": statistics.median(p[1] for p in phases),
               "optimizer_step_median_ms": statistics.median(p[2] for p in phases),
               "optimizer_step_ms": [p[2] for p in phases],
               "planned_state_bytes": plan_row["state_bytes"], "measured_state_bytes": state_nbytes(opt),
               "planned_train_step_bytes": plan_row["training_step_bytes"],
               "peak_allocated_bytes": cuda_mem("max_memory_allocated"),
               "peak_reserved_bytes": cuda_mem("max_memory_reserved"),
               "shadow_allocated_step": shadow_step, "losses": losses,
               "nonfinite_losses": sum(not math.isfinite(x) for x in losses)}
        row["state_match"] = row["measured_state_bytes"] == row["planned_state_bytes"]
        row["peak_minus_plan_bytes"] = row["peak_allocated_bytes"] - row["planned_train_step_bytes"]
        del opt
        say(f"{key:16s} {row['it_per_s']:.3f} it/s (median {1e3 * med:.0f} ms; fwd+bwd {row['fwd_bwd_median_ms']:.0f}, "
            f"clip {row['clip_median_ms']:.1f}, opt {row['optimizer_step_median_ms']:.1f} ms) peak alloc "
            f"{row['peak_allocated_bytes'] / MIB:,.0f} MiB; state {'match' if row['state_match'] else 'MISMATCH'}")
        return row

    rows = []
    result = {"config": {k: getattr(cfg, k) for k in ("model", "rank", "alpha", "conv_rank", "conv_alpha",
                                                       "mixed_precision", "gradient_checkpointing", "resolution",
                                                       "batch_size", "lr", "max_grad_norm")},
              "lora_params": planned["lora_params"], "lora_tensors": planned["lora_tensors"],
              "build_seconds": t_build, "model_allocated_bytes": model_alloc, "rows": rows}
    for name, shadow in rows_wanted:
        try:
            rows.append(run_row(name, shadow))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"key": vram.row_key(name, shadow), "error": f"{type(exc).__name__}: {exc}"})
        with open(os.path.join(args.out, "gpu_sdxl_rows.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
    del unet, params
    return result


# -- the shipped command -------------------------------------------------------------

def part_cli(args) -> dict:
    cmd = [sys.executable, "-m", "emotrain", "vram", "--model", args.model, "--rank", "32", "--alpha", "16",
           "--conv-rank", "8", "--conv-alpha", "4", "--mixed-precision", "bf16", "--measure",
           "--measure-steps", "3", "--json"]
    if args.smoke:  # the tiny model, small and in fp32 on the CPU
        cmd[cmd.index("--rank") + 1] = "8"
        cmd[cmd.index("--mixed-precision") + 1] = "no"
        cmd += ["--resolution", "64", "--optim", "emoairy,adamw"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cli_timeout, cwd=ROOT)
    seconds = time.perf_counter() - t0
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
                     "peak_reserved_bytes": c.get("peak_reserved_bytes")})
    return {"command": " ".join(["emotrain"] + cmd[3:]), "seconds": seconds, "device": m["device"],
            "gradient_checkpointing": m["gradient_checkpointing"], "resolution": m["resolution"],
            "lora_params": m["lora_params"], "rows": rows}


# -- where the time goes ------------------------------------------------------------------

def part_diag(args) -> dict:
    from diffusers import DDPMScheduler
    from torch.profiler import ProfilerActivity, profile

    from emotrain import sdxl
    from emotrain.loss import Objective
    out = {}
    x = torch.zeros(1, device=common.DEV)
    for _ in range(1000):
        x.add_(1)
    sync()
    t = time.perf_counter()
    for _ in range(20000):
        x.add_(1)
    sync()
    out["tiny_kernel_launch_us"] = 1e6 * (time.perf_counter() - t) / 20000
    if common.DEV.type == "cuda":
        a = torch.randn(8192, 8192, device=common.DEV, dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        m0 = Mark()
        for _ in range(10):
            a @ a
        m1 = Mark()
        sync()
        out["bf16_matmul_tflops"] = 10 * 2 * 8192 ** 3 / (m0.ms_to(m1) * 1e-3) / 1e12
        del a
    cfg = run_config(args.model)
    unet = build_unet(cfg)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    scheduler = DDPMScheduler.from_config(sdxl.load_config("sdxl_scheduler"))

    def step():
        batch = random_batch(unet.config, 1, cfg.resolution, gen)
        with torch.autocast(common.DEV.type, dtype=torch.bfloat16):
            loss = Objective(min_snr_gamma=5.0).loss(unet, scheduler, batch["latents"], batch["hidden"],
                                                     batch["pooled"], batch["time_ids"], gen)
        loss.backward()
        loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if common.DEV.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - t
    on_gpu = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    out.update(profiled_step_wall_s=wall, gpu_events=len(on_gpu),
               gpu_busy_s=sum(e.device_time_total for e in on_gpu) * 1e-6)
    say(json.dumps(out))
    return out


# -- main --------------------------------------------------------------------------------

def summary(res: dict) -> None:
    say("\n==== gpu_sdxl summary ====")
    say(f"{res['environment'].get('nvidia_smi')} | torch {res['environment'].get('torch')}")
    if "sdxl" in res:
        s = res["sdxl"]
        say(f"{s['config']} ({s['lora_params']:,} LoRA params): it/s | median step ms | fwd+bwd | clip | "
            "optimizer step ms | peak alloc MiB | peak - plan MiB | state planned = measured")
        for r in s["rows"]:
            if "error" in r:
                say(f"  {r['key']}: {r['error']}")
                continue
            say(f"  {r['key']:16s} {r['it_per_s']:.3f} {1e3 * r['step_median_s']:7.0f} {r['fwd_bwd_median_ms']:7.0f} "
                f"{r['clip_median_ms']:6.1f} {r['optimizer_step_median_ms']:7.1f} {r['peak_allocated_bytes'] / MIB:8,.0f} "
                f"{r['peak_minus_plan_bytes'] / MIB:7,.0f} {r['state_match']}")
    if "cli" in res:
        c = res["cli"]
        say(f"`{c['command']}` ({c['seconds']:.0f} s, {c['device']}, checkpointing {c['gradient_checkpointing']}):")
        for r in c["rows"]:
            say(f"  {r['key']:16s} state {r['planned_state_bytes']:,}/{r['measured_state_bytes']:,} "
                f"{'match' if r['match'] else 'MISMATCH'} peak {(r['peak_allocated_bytes'] or 0) / MIB:,.0f} MiB "
                f"(plan {r['planned_train_step_bytes'] / MIB:,.0f} MiB)")
    for part, err in res.get("errors", {}).items():
        say(f"ERROR in {part}: {err}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--parts", default="sdxl,cli")
    ap.add_argument("--optims", default="all", help="optimizers of part sdxl: all, or a comma-separated list")
    ap.add_argument("--shadow", default="both", choices=["off", "on", "both"], help="Emo rows of part sdxl")
    ap.add_argument("--steps", type=int, default=10, help="timed SDXL steps per optimizer")
    ap.add_argument("--warmup", type=int, default=3, help="untimed SDXL steps per optimizer")
    ap.add_argument("--cli-timeout", type=int, default=200, help="seconds for the emotrain vram --measure run")
    ap.add_argument("--smoke", action="store_true", help="check the script on the CPU (tiny model, 2 steps)")
    args = ap.parse_args()
    args.model = "sdxl"
    if args.smoke:
        common.use_device("cpu")
        args.model, args.steps, args.warmup = "tiny", 2, 2
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke)")
    run_parts("gpu_sdxl", {"sdxl": part_sdxl, "cli": part_cli, "diag": part_diag}, args.parts, args.out, args,
              summary)


if __name__ == "__main__":
    main()
