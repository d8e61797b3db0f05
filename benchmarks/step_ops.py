"""How many operations one SDXL training step launches, counted without hardware.

    python benchmarks/step_ops.py              # the table (about a minute on 2 cores)
    python benchmarks/step_ops.py --peft       # the same with peft's own LoRA forward
    python benchmarks/step_ops.py --cpu-steps 5 --no-sdxl  # the tiny model's CPU step only
    python benchmarks/step_ops.py --cpu-steps 5 --no-sdxl --baseline OLD/emotrain/lora/fast.py  # and another version's

Counts the aten operations dispatched (``TorchDispatchMode``) by one forward and backward
of the training loss (``emotrain.loss.Objective``: noise, min-SNR 5) on SDXL 1.0's UNet
(the shipped config) at 1024 px, batch 1, bf16 base weights with fp32 LoRA under bf16
autocast, rank 32 / alpha 16, conv rank 8 / alpha 4, gradient checkpointing on and off,
``full`` and ``transformer`` targets. The UNet is built from meta tensors (``FakeTensorMode``:
shapes only, no memory, no kernels) placed on a fake CPU device, so that autocast applies
as it does in training (the meta device has no autocast). CPU autocast's policy is used:
it keeps group_norm and layer_norm in bf16, where CUDA's runs them in fp32, so on a GPU
the UNet itself adds casts this count does not see; the LoRA layers' casts are the same
under both policies.

"non-view" leaves out the operations that make no kernel (views, reshapes, detach,
transposes, ``t``...); ``_to_copy`` is a dtype cast; ``mm``/``addmm`` the matrix
products. ``--peft`` counts the forward peft itself runs (the ``lora`` kind before
issue 20); without it, emotrain's (``emotrain.lora.fast``). ``--adapter dora,loha,lokr``
counts the other kinds (peft's forwards). ``--breakdown`` adds where the non-view ops come
from: phase (forward, backward, recompute: checkpointing's second forward inside the
backward) and source (lora: emotrain's fused functions, each layer's base product
included; shadows: the factors' copies; unet: everything else). ``--cuda-products``
counts the fp32 gradient products as CUDA runs them (one ``out_dtype`` product, no cast);
without it, as the CPU does (a product and a cast).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
import time
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

def is_view(func) -> bool:
    """Whether ``func`` only makes a view or an alias (no kernel runs)."""
    schema = func._schema
    if func.is_view or func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
        return True
    # _unsafe_view, view, t, transpose, expand, ... all return an alias of an input
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns) \
        or func.__name__.split(".")[0] in ("_unsafe_view", "lift_fresh")


class OpCounter(TorchDispatchMode):
    """Counts aten ops, each also under where it came from: ``phase`` (forward, backward,
    or recompute: a module's forward run again inside the backward by checkpointing) and
    ``source`` (lora: inside emotrain's fused LoRA functions, their layer's own base
    product included; shadows: the once-per-step copies of the factors; unet: the rest,
    peft's own LoRA forward included where it runs)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.where = collections.Counter()  # (phase, source, non_view) -> ops
        self.phase, self.source, self.depth = "forward", "unet", 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "aten":  # FakeTensor's own queries (prim.device), no kernel
            return func(*args, **(kwargs or {}))
        view = is_view(func)
        self.ops[func.overloadpacket.__name__ + ("" if not view else " (view)")] += 1
        phase = "recompute" if self.phase == "backward" and self.depth else self.phase
        self.where[(phase, self.source, not view, func.overloadpacket.__name__ == "_to_copy")] += 1
        return func(*args, **(kwargs or {}))

    def breakdown(self) -> dict:
        """(phase, source) -> (non-view ops, casts)."""
        out = collections.defaultdict(lambda: [0, 0])
        for (phase, source, non_view, cast), n in self.where.items():
            if non_view:
                out[(phase, source)][0] += n
                out[(phase, source)][1] += n if cast else 0
        return dict(out)

    def summary(self) -> dict:
        non_view = {k: v for k, v in self.ops.items() if not k.endswith("(view)")}
        return {"all": sum(self.ops.values()), "non_view": sum(non_view.values()),
                "_to_copy": non_view.get("_to_copy", 0),
                "matmul": sum(non_view.get(k, 0) for k in ("mm", "addmm", "bmm", "baddbmm")),
                "mul": non_view.get("mul", 0), "add": non_view.get("add", 0),
                "top": sorted(non_view.items(), key=lambda kv: -kv[1])[:8], "where": self.breakdown()}


@contextlib.contextmanager
def attributed(counter: OpCounter):
    """Tags ``counter``'s ops with their source and phase (see OpCounter) for the span."""
    from emotrain.lora import fast

    def tagged(fn, source):
        def run(*args, **kwargs):
            before, counter.source = counter.source, source
            try:
                return fn(*args, **kwargs)
            finally:
                counter.source = before
        return run

    saved = [(cls, name, cls.__dict__[name]) for cls in (fast._LinearLora, fast._ConvLora)
             for name in ("forward", "backward")] + [(fast.Shadows, "refresh", fast.Shadows.refresh)]
    for cls, name, fn in saved:
        inner = fn.__func__ if isinstance(fn, staticmethod) else fn
        wrapped = tagged(inner, "shadows" if cls is fast.Shadows else "lora")
        setattr(cls, name, staticmethod(wrapped) if isinstance(fn, staticmethod) else wrapped)

    stack = []

    def pre(module, args):  # a module's own ops are the UNet's (a checkpoint's recompute runs
        counter.depth += 1  # inside a LoRA function's backward, when it unpacks its inputs)
        stack.append(counter.source)
        counter.source = "unet"

    def post(module, args, out):
        counter.depth -= 1
        counter.source = stack.pop()

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
             torch.nn.modules.module.register_module_forward_hook(post, always_call=True)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def fake_cpu(module: torch.nn.Module, mode) -> None:
    """Every parameter and buffer of a meta-device module as a fake CPU tensor."""
    from torch._subclasses.fake_tensor import FakeTensor

    cpu = torch.device("cpu")
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(FakeTensor(mode, p.data, cpu), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = FakeTensor(mode, b, cpu)


def training_loss(unet, resolution: int, dtype, cross: int):
    from diffusers import DDPMScheduler
    from emotrain.loss import Objective

    side = resolution // 8
    latents = torch.randn(1, 4, side, side)
    embeds, pooled = torch.randn(1, 77, cross), torch.randn(1, 1280 if cross == 2048 else 32)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    return Objective(min_snr_gamma=5.0, dtype=dtype).loss(unet, DDPMScheduler(num_train_timesteps=1000), latents,
                                                          embeds, pooled, time_ids, torch.Generator().manual_seed(0))


def sdxl_step_ops(targets: str, checkpointing: bool, peft: bool = False, rank: int = 32, conv_rank: int = 8,
                  resolution: int = 1024, adapter: str = "lora", cuda_products: bool = False) -> dict:
    """The op counts of one training forward+backward on SDXL 1.0's UNet (fake tensors).
    ``cuda_products``: the LoRA functions take CUDA's route for the factors' fp32
    gradients (one product with ``out_dtype``, emotrain.lora.fast._fp32_product) where the
    CPU's is a product and a cast; the rest of the count is unchanged."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from emotrain import sdxl
    from emotrain.lora import fast
    from emotrain.lora.inject import add_lora, unet_lora_config

    bf16 = torch.bfloat16
    unet = sdxl.meta_unet(sdxl.load_config("sdxl_unet")).to(bf16)
    with torch.device("meta"):
        add_lora(unet, unet_lora_config(rank, rank / 2, conv_rank, conv_rank / 2, targets, adapter), fast=not peft)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_cpu(unet, mode)
    with mode:
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        counter = OpCounter()
        with attributed(counter), counter, mock.patch.dict(fast._OUT_DTYPE, {"cpu": cuda_products}):
            with torch.autocast("cpu", dtype=bf16):
                loss = training_loss(unet, resolution, bf16, 2048)
            counter.phase = "backward"
            loss.backward()
    from peft.tuners.tuners_utils import BaseTunerLayer
    lora_layers = sum(1 for m in unet.modules() if isinstance(m, BaseTunerLayer))  # any adapter kind
    return {**counter.summary(), "layers": lora_layers}


def cpu_step_seconds(steps: int, rounds: int = 3, baseline: str | None = None) -> dict:
    """Median seconds of one forward+backward of the tiny model (batch 1, 64 px, bf16 base,
    fp32 LoRA rank 4 under bf16 autocast, checkpointing on) with peft's forward, with
    emotrain's, and (``baseline``: the path of another version's emotrain/lora/fast.py)
    with that one, interleaved round by round in one process; wall time and the process's
    CPU time (the work itself, less sensitive to a loaded machine). Each step ends with an
    in-place write to every factor, as an optimizer step does (the copies are remade)."""
    import importlib.util

    from diffusers import UNet2DConditionModel
    from emotrain.lora.inject import add_lora, unet_lora_config
    from emotrain.lora.weights import ADAPTER
    from emotrain.sdxl.tiny import TINY_UNET

    def build(install=None):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(TINY_UNET).to(torch.bfloat16)
        add_lora(unet, unet_lora_config(4, 4, 4, 4, "full"), fast=install is None)
        if install not in (None, "peft"):
            install(unet, ADAPTER)
        unet.enable_gradient_checkpointing()
        return unet.train()

    models = {"peft": build("peft"), "emotrain": build()}
    if baseline:
        spec = importlib.util.spec_from_file_location("baseline_fast", baseline)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        models["baseline"] = build(module.install)
    times = {k: [] for k in models}
    cpu = {k: [] for k in models}
    for _ in range(rounds):
        for name, unet in models.items():
            params = [p for p in unet.parameters() if p.requires_grad]
            for _ in range(steps):
                started, started_cpu = time.perf_counter(), time.process_time()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = training_loss(unet, 64, torch.bfloat16, TINY_UNET["cross_attention_dim"])
                loss.backward()
                with torch.no_grad():
                    torch._foreach_mul_(params, 1.0)  # the optimizer's in-place write
                unet.zero_grad(set_to_none=True)
                times[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - started_cpu)
    return {**{k: statistics.median(v) for k, v in times.items()},
            **{f"{k} (CPU time)": statistics.median(v) for k, v in cpu.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peft", action="store_true", help="count peft's own LoRA forward")
    ap.add_argument("--cpu-steps", type=int, default=0, help="also time N tiny-model steps per round")
    ap.add_argument("--no-sdxl", action="store_true", help="only the tiny model's CPU time")
    ap.add_argument("--baseline", help="another version's emotrain/lora/fast.py, timed beside (--cpu-steps)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --cpu-steps steps per forward")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the CPU timing (0: torch's default)")
    ap.add_argument("--adapter", default="lora", help="adapter kinds, comma-separated (lora,dora,loha,lokr)")
    ap.add_argument("--targets", default="full,transformer", help="comma-separated")
    ap.add_argument("--checkpointing", default="on,off", help="on, off or both (comma-separated)")
    ap.add_argument("--cuda-products", action="store_true",
                    help="the LoRA gradients' products as CUDA runs them (fp32 out_dtype, no cast)")
    ap.add_argument("--breakdown", action="store_true", help="also the ops by phase and source")
    ap.add_argument("--resolution", type=int, default=1024, help="pixels (the counts barely depend on it)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_steps:
        t = cpu_step_seconds(args.cpu_steps, args.rounds, args.baseline)
        print("tiny model, CPU, bf16 autocast, checkpointing, ms per forward+backward (median of "
              f"{args.cpu_steps * args.rounds}): " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in t.items()), flush=True)
    if args.no_sdxl:
        return
    print("| forward | products | kind | targets | checkpointing | adapter layers | aten ops | non-view | _to_copy | "
          "mm+addmm+bmm | mul | add | top non-view ops |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for kind in args.adapter.split(","):
        for targets in args.targets.split(","):
            for ckpt in args.checkpointing.split(","):
                started = time.perf_counter()
                try:
                    s = sdxl_step_ops(targets, ckpt == "on", args.peft, resolution=args.resolution, adapter=kind,
                                      cuda_products=args.cuda_products)
                except Exception as e:  # noqa: BLE001 - a kind whose forward cannot run on fake tensors
                    print(f"| {kind} | {targets} | {ckpt} | not countable on fake tensors: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120]} |", flush=True)
                    continue
                top = ", ".join(f"{k} {v:,}" for k, v in s["top"])
                print(f"| {'peft' if args.peft or kind != 'lora' else 'emotrain'} | {'cuda' if args.cuda_products else 'cpu'} | {kind} | {targets} | "
                      f"{ckpt} | {s['layers']} | {s['all']:,} | {s['non_view']:,} | {s['_to_copy']:,} | "
                      f"{s['matmul']:,} | {s['mul']:,} | {s['add']:,} | {top} |  ({time.perf_counter() - started:.0f} s)",
                      flush=True)
                if args.breakdown:
                    for (phase, source), (n, casts) in sorted(s["where"].items()):
                        print(f"|   | {phase} | {source} | non-view {n:,} | casts {casts:,} |", flush=True)


if __name__ == "__main__":
    main()
