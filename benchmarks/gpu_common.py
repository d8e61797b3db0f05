"""What benchmarks/gpu_optim.py and benchmarks/gpu_sdxl.py share: the device, timing marks,
the environment record, the LoRA parameter shapes, and results written part by part."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

MB = 1_000_000
MIB = 1 << 20
# --smoke switches to "cpu", to check a script on a machine without a GPU.
DEV = torch.device("cuda")


def use_device(name: str) -> None:
    global DEV
    DEV = torch.device(name)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


class Mark:
    """A point in the stream: a CUDA event on the GPU, a host clock on the CPU."""

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


def cuda_mem(fn_name: str, default: int = 0) -> int:
    return getattr(torch.cuda, fn_name)() if DEV.type == "cuda" else default


def say(*a) -> None:
    print(*a, flush=True)


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "cpu_count": os.cpu_count()}
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


def lora_shapes(rank: int, alpha: float, conv_rank: int, conv_alpha: float) -> list[tuple]:
    """Shapes of the trainable tensors of SDXL's full-layer LoRA (built on the meta device)."""
    from emotrain.lora.inject import meta_lora_unet
    unet = meta_lora_unet(model="sdxl", rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha)
    return [tuple(p.shape) for p in unet.parameters() if p.requires_grad]


def load_optim_from(folder: str, name: str = "optim_before"):
    """Another copy of the optim package (say, main's, to time before against after) under
    its own module name, beside the one this checkout imports as ``optim``."""
    folder = os.path.abspath(folder)
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_parts(title: str, parts: dict, chosen: str, out: str, args, summary) -> dict:
    """Run the chosen parts in order; DIR/<title>.json is rewritten after each one, so a
    part cut short by a timeout leaves the earlier ones on disk."""
    os.makedirs(out, exist_ok=True)
    res = {"environment": environment(), "argv": sys.argv, "errors": {}, "seconds": {}}
    say(json.dumps(res["environment"]))
    path = os.path.join(out, f"{title}.json")
    for part in [p.strip() for p in chosen.split(",") if p.strip()]:
        t0 = time.perf_counter()
        try:
            res[part] = parts[part](args)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            res["errors"][part] = f"{type(exc).__name__}: {exc}"
        res["seconds"][part] = round(time.perf_counter() - t0, 1)
        say(f"-- part {part} done in {res['seconds'][part]} s")
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=str)
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    summary(res)
    return res
