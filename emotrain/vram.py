"""VRAM planning per optimizer, and the measurements that check the plan.

The plan never estimates optimizer state from a formula: it builds the model on the meta
device, applies the training LoRA, constructs each optimizer on those parameters and lets
the optimizer allocate its own state (on meta, so nothing is allocated). The state bytes
are then read back the same way a real run's are, so plan and measurement cannot drift
apart when an optimizer changes its state layout.
"""

from __future__ import annotations

import copy
import gc
import io
import re
import resource
import sys
import time
from pathlib import Path

import torch

from optim import state_nbytes

from .errors import UserError
from .optimizers import EMO, build_optimizer, takes_loss

MB = 1_000_000  # the published claim (340 MB for 85 M fp32 values) is in decimal megabytes
ALL_OPTIMIZERS = ("emosens", "emoairy", "emocats", "adamw", "adamw8bit", "adafactor", "lion")
REFERENCE = "emocats"  # the published figures are relative to EmoCats, shadow off
PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHADOW_CHOICES = ("off", "on", "both")
DISPLAY = {**EMO, "adamw": "AdamW", "adamw8bit": "AdamW8bit", "adafactor": "Adafactor", "lion": "Lion"}
# Loss added to what the optimizer is told on step 2 of a shadow-on measurement: the
# shadow buffer appears only once |s| > 0.1, which random data need not reach in a few
# steps; this jump makes s ~ 1 on step 2 while the gradients stay the real ones.
EMOTION_JUMP = 10.0
PLAN_LR = 1e-4  # no optimizer here sizes its state by the learning rate

# LoRA module kinds, by module-name suffix, to show where the published figure comes from.
LAYER_KINDS = (
    ("attention", r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    ("feed-forward", r"ff\.net\.(0\.proj|2)$"),
    ("transformer proj_in/out", r"(proj_in|proj_out)$"),
    ("resnet conv1/conv2", r"resnets\.\d+\.(conv1|conv2)$"),
    ("resnet shortcut + time_emb_proj", r"resnets\.\d+\.(conv_shortcut|time_emb_proj)$"),
    ("down/up-sampler conv", r"(down|up)samplers\.0\.conv$"),
    ("text encoders", r"^text_encoder"),
)
TRANSFORMER_KINDS = ("attention", "feed-forward", "transformer proj_in/out")
# LoRA placements: emotrain's full-layer LoRA, or only the UNet's transformer blocks
# (kohya's default UNet targets; at rank 32 they hold the published "about 85 M").
TARGETS = ("full", "transformer")
TRANSFORMER_TARGETS = r"^(.*\.)?(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$"


# -- the model on the meta device ------------------------------------------------------

def shadow_settings(shadow) -> tuple[bool, ...]:
    """``"off"``/``"on"``/``"both"`` (or a bool) -> the shadow settings to plan for."""
    if isinstance(shadow, bool):
        return (shadow,)
    if shadow not in SHADOW_CHOICES:
        raise UserError(f"shadow must be one of {', '.join(SHADOW_CHOICES)}, got {shadow!r}")
    return {"off": (False,), "on": (True,), "both": (False, True)}[shadow]


def parse_optims(optims) -> list[str]:
    """``"all"``, ``"emosens,adamw"`` or a list -> optimizer names, in the given order."""
    if optims is None or optims == "all" or optims == ["all"]:
        return list(ALL_OPTIMIZERS)
    items = optims.split(",") if isinstance(optims, str) else list(optims)
    names = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip()
            if name == "all":
                names.extend(n for n in ALL_OPTIMIZERS if n not in names)
            elif name and name not in names:
                names.append(name)
    if not names:
        raise UserError("no optimizer given: pass --optim all or a comma-separated list such as emosens,adamw")
    return names


def _model_configs(model: str) -> dict:
    """Configs of the four SDXL networks: (class, config) per component."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig

    from .sdxl import load_config

    def shipped():
        return {"text_encoder": ("CLIPTextModel", CLIPTextConfig(**load_config("sdxl_text_encoder"))),
                "text_encoder_2": ("CLIPTextModelWithProjection", CLIPTextConfig(**load_config("sdxl_text_encoder_2"))),
                "vae": ("AutoencoderKL", load_config("sdxl_vae"))}

    if model == "sdxl" or Path(model).suffix == ".safetensors":
        # A single-file checkpoint is SDXL 1.0's architecture; its UNet config is the shipped one too.
        return shipped()
    from .sdxl import resolve_model
    folder = resolve_model(model)
    try:
        return {"text_encoder": ("CLIPTextModel", CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")),
                "text_encoder_2": ("CLIPTextModelWithProjection",
                                   CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")),
                "vae": ("AutoencoderKL", AutoencoderKL.load_config(folder, subfolder="vae"))}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the model configs in {folder} ({exc})".splitlines()[0]) from None


def meta_sdxl(model: str = "sdxl", rank: int = 16, alpha: float | None = None, conv_rank: int | None = None,
              conv_alpha: float | None = None, train_text_encoders: bool = False,
              targets: str = "full") -> dict[str, torch.nn.Module]:
    """UNet, both text encoders and VAE on the meta device, with the training LoRA
    (text encoders too when they are trained)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig

    from .sdxl import add_lora, load_config, meta_lora_unet, meta_unet, resolve_model, text_encoder_lora_config

    alpha = float(rank if alpha is None else alpha)
    unet_model = model
    if model not in ("sdxl", "tiny") and Path(model).suffix == ".safetensors":
        unet_model = "sdxl"
    elif model not in ("sdxl", "tiny"):
        unet_model = resolve_model(model)
    if targets == "full":
        modules = {"unet": meta_lora_unet(unet_model, rank, alpha, conv_rank, conv_alpha)}
    elif targets == "transformer":
        unet = meta_unet(load_config("sdxl_unet") if unet_model == "sdxl" else
                         UNet2DConditionModel.load_config(resolve_model(unet_model), subfolder="unet"))
        with torch.device("meta"):
            add_lora(unet, LoraConfig(r=rank, lora_alpha=alpha, target_modules=TRANSFORMER_TARGETS))
        modules = {"unet": unet}
    else:
        raise UserError(f"LoRA targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    configs = _model_configs(model)  # may build the tiny model: real tensors, outside the meta context
    with torch.device("meta"):
        for name, (cls, config) in configs.items():
            if name == "vae":
                modules[name] = AutoencoderKL.from_config(config)
            else:
                modules[name] = getattr(transformers, cls)(config)
                modules[name].requires_grad_(False)
                if train_text_encoders:
                    add_lora(modules[name], text_encoder_lora_config(rank, alpha))
    modules["vae"].requires_grad_(False)
    return modules


def lora_parameters(modules: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for m in modules.values() for p in m.parameters() if p.requires_grad]


def _lora_breakdown(modules: dict[str, torch.nn.Module]) -> dict[str, dict]:
    """LoRA parameters per layer kind, from the module names that carry a LoRA."""
    out = {kind: {"modules": 0, "params": 0} for kind, _ in LAYER_KINDS}
    for component, module in modules.items():
        for name, sub in module.named_modules():
            if not hasattr(sub, "lora_A") or "default" not in getattr(sub, "lora_A", {}):
                continue
            n = sum(p.numel() for adapter in (sub.lora_A, sub.lora_B) for p in adapter.parameters())
            full = f"{component}.{name}" if component != "unet" else name
            kind = next((k for k, pattern in LAYER_KINDS if re.search(pattern, full)), "other")
            entry = out.setdefault(kind, {"modules": 0, "params": 0})
            entry["modules"] += 1
            entry["params"] += n
    return {k: v for k, v in out.items() if v["modules"]}


def _module_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the frozen weights (and buffers) once cast to ``dtype``; LoRA excluded."""
    total = 0
    tensors = [t for n, t in module.named_parameters() if "lora_" not in n]
    tensors += [t for n, t in module.named_buffers() if "lora_" not in n]
    for t in tensors:
        size = torch.empty((), dtype=dtype).element_size() if t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


def base_weight_bytes(modules: dict[str, torch.nn.Module], mixed_precision: str = "no") -> dict[str, int]:
    """Frozen weights per component at the training precision; the VAE stays fp32,
    as training keeps it (SDXL's VAE overflows in fp16)."""
    if mixed_precision not in PRECISIONS:
        raise UserError(f"mixed precision must be one of {', '.join(PRECISIONS)}, got {mixed_precision!r}")
    dtype = PRECISIONS[mixed_precision]
    return {name: _module_bytes(m, torch.float32 if name == "vae" else dtype) for name, m in modules.items()}


# -- optimizer state without memory ----------------------------------------------------

def _bnb_init_state(opt) -> None:
    # bitsandbytes kernels cannot run on meta tensors, but the allocation is a method of
    # its own: do what its step() does before the first update, and stop there.
    if not opt.initialized:
        opt.check_overrides()
        opt.to_gpu()
        opt.initialized = True
    for gindex, group in enumerate(opt.param_groups):
        for pindex, p in enumerate(group["params"]):
            if p.requires_grad and len(opt.state[p]) == 0:
                opt.init_state(group, p, gindex, pindex)


def _meta_step(opt) -> None:
    # torch optimizers and transformers' Adafactor allocate their state inside step();
    # with meta parameters and meta gradients a step is shapes only. Meta kernels run op
    # by op in Python, and SDXL's ~1,600 LoRA tensors come in a few dozen shapes, so only
    # the first parameter of each (shape, dtype) in a group is stepped; the others get a
    # state laid out like it (same keys, shapes, dtypes and devices).
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    if any(p.device.type != "meta" for p in params):
        raise ValueError("planning by a step needs meta-device parameters; this would update real weights")
    saved = [group["params"] for group in opt.param_groups]
    followers = []
    for group in opt.param_groups:
        reps = {}
        for p in group["params"]:
            if not p.requires_grad:
                continue
            key = (tuple(p.shape), p.dtype)
            if key in reps:
                followers.append((p, reps[key]))
            else:
                reps[key] = p
        group["params"] = list(reps.values())
        if "foreach" in group:  # foreach kernels do not accept meta tensors everywhere
            group["foreach"] = False
        if group.get("fused"):
            group["fused"] = False
    stepped = [p for group in opt.param_groups for p in group["params"]]
    for p in stepped:
        p.grad = torch.zeros_like(p)
    try:
        opt.step()
    finally:
        for group, params_ in zip(opt.param_groups, saved):
            group["params"] = params_
        for p in stepped:
            p.grad = None
    for p, rep in followers:
        opt.state[p] = {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                        for k, v in opt.state[rep].items()}


def init_optimizer_state(opt, include_shadow: bool | None = None) -> None:
    """Make ``opt`` allocate the state its first steps would, without updating anything.
    On meta-device parameters nothing is allocated."""
    if takes_loss(opt) and hasattr(opt, "init_state"):
        opt.init_state(include_shadow=include_shadow)
    elif type(opt).__module__.startswith("bitsandbytes") and hasattr(opt, "init_state"):
        _bnb_init_state(opt)
    else:
        _meta_step(opt)


def measure_state_bytes(optimizer) -> int:
    """Bytes of every tensor the optimizer holds in ``optimizer.state``."""
    return state_nbytes(optimizer)


def planned_state_bytes(name: str, params, shadow: bool = False, args: dict | None = None) -> int:
    """State bytes of optimizer ``name`` for ``params`` (meta-device parameters)."""
    opt = build_optimizer(name, params, PLAN_LR, shadow=shadow, args=args)
    init_optimizer_state(opt)
    n = measure_state_bytes(opt)
    del opt
    return n


# -- the plan --------------------------------------------------------------------------

def row_key(name: str, shadow: bool) -> str:
    return f"{name}-shadow" if shadow else name


def _rows(names: list[str], shadows: tuple[bool, ...]) -> list[tuple[str, bool]]:
    rows = []
    for name in names:
        if name in EMO:
            rows.extend((name, s) for s in shadows)
        else:
            rows.append((name, False))
    return rows


def plan(model: str = "sdxl", rank: int = 16, alpha: float | None = None, conv_rank: int | None = None,
         conv_alpha: float | None = None, optims="all", shadow="both", mixed_precision: str = "no",
         train_text_encoders: bool = False, optim_args: dict[str, dict] | None = None,
         targets: str = "full") -> dict:
    """Memory of a LoRA run per optimizer, in bytes: LoRA weights (fp32), optimizer state,
    gradients (fp32) and frozen base weights. Activations are not included: they depend
    on batch size, resolution and checkpointing, and are the same for every optimizer.
    ``optim_args``: optimizer name -> keyword arguments, for options that change the
    state (e.g. ``{"adamw8bit": {"min_8bit_size": 16384}}``). ``targets="transformer"``
    plans kohya's default UNet LoRA instead of the full-layer one, for comparisons.

    ``total_bytes`` holds every frozen network (UNet, text encoders, VAE), as a trainer
    that keeps them loaded needs; ``training_step_bytes`` holds only what emotrain's loop
    keeps once latents and captions are cached: the UNet, and the text encoders when
    they are trained."""
    started = time.perf_counter()
    names = parse_optims(optims)
    rows = _rows(names, shadow_settings(shadow))
    modules = meta_sdxl(model, rank, alpha, conv_rank, conv_alpha, train_text_encoders, targets)
    params = lora_parameters(modules)
    lora_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = lora_bytes  # gradients take the dtype of the fp32 LoRA weights
    base = base_weight_bytes(modules, mixed_precision)
    base_total = sum(base.values())
    resident = ("unet", "text_encoder", "text_encoder_2") if train_text_encoders else ("unet",)
    base_resident = sum(base[c] for c in resident)

    def state_of(name, s):
        return planned_state_bytes(name, params, shadow=s, args=(optim_args or {}).get(name))

    states = {(name, s): state_of(name, s) for name, s in dict.fromkeys(rows + [(REFERENCE, False)])}
    reference_total = lora_bytes + grad_bytes + base_total + states[(REFERENCE, False)]
    out_rows = {}
    for name, s in rows:
        state = states[(name, s)]
        total = lora_bytes + state + grad_bytes + base_total
        out_rows[row_key(name, s)] = {
            "optimizer": name, "shadow": s, "lora_param_bytes": lora_bytes, "state_bytes": state,
            "grad_bytes": grad_bytes, "base_bytes": base_total, "total_bytes": total,
            "delta_vs_emocats_bytes": total - reference_total,
            "training_step_bytes": total - base_total + base_resident,
        }
    breakdown = _lora_breakdown(modules)
    by_component = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in modules.items()}
    attention = breakdown.get("attention", {}).get("params", 0)
    transformer = sum(breakdown.get(k, {}).get("params", 0) for k in TRANSFORMER_KINDS)
    return {
        "model": model, "rank": rank, "alpha": float(rank if alpha is None else alpha),
        "conv_rank": rank if conv_rank is None else conv_rank,
        "conv_alpha": float((rank if alpha is None else alpha) if conv_alpha is None else conv_alpha),
        "mixed_precision": mixed_precision, "train_text_encoders": train_text_encoders, "targets": targets,
        "lora_params": sum(p.numel() for p in params), "lora_tensors": len(params),
        "lora_modules": sum(v["modules"] for v in breakdown.values()),
        "lora_params_by_component": {k: v for k, v in by_component.items() if v},
        "lora_params_by_layer": breakdown,
        "base_bytes_by_component": base,
        "resident_while_training": list(resident),
        # Where the published "+-300 MB" comes from: one fp32 value per LoRA weight of the
        # UNet's transformer blocks (kohya's default LoRA targets), at this rank.
        "reference": {"optimizer": REFERENCE, "shadow": False, "total_bytes": reference_total,
                      "attention_only_params": attention, "transformer_blocks_params": transformer,
                      "one_fp32_state_bytes": lora_bytes,
                      "one_fp32_state_bytes_transformer_blocks": transformer * 4},
        "unit": "bytes", "mb": MB,
        "optimizers": out_rows,
        "seconds": round(time.perf_counter() - started, 2),
    }


# -- rendering -------------------------------------------------------------------------

def _mb(n: int) -> str:
    return f"{n / MB:,.1f}"


def _delta(n: int) -> str:
    return "0" if n == 0 else f"{n / MB:+,.1f}"


def row_label(name: str, shadow: bool) -> str:
    return DISPLAY.get(name, name) + (" + shadow" if shadow else "")


def _render(table) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=120, color_system=None, force_terminal=False)
    console.print(table)
    return console.file.getvalue()


def format_table(p: dict) -> str:
    """The plan as a table (rich), with the LoRA breakdown and the published claim."""
    from rich.table import Table

    te = " + text-encoder LoRA" if p["train_text_encoders"] else ""
    kind = (f"full-layer LoRA rank {p['rank']} (conv {p['conv_rank']})" if p.get("targets", "full") == "full"
            else f"transformer-block LoRA rank {p['rank']}")
    title = (f"VRAM plan: {p['model']}, {kind}{te}, "
             f"{p['lora_params']:,} LoRA params, base weights {p['mixed_precision'] if p['mixed_precision'] != 'no' else 'fp32'}")
    kept = " + ".join(p["resident_while_training"])
    table = Table(title=title)
    for col in ("Optimizer", "LoRA", "Opt. state", "Grads", "Base", "Total", "vs EmoCats", "Train step"):
        table.add_column(col, justify="left" if col == "Optimizer" else "right", no_wrap=True)
    for row in p["optimizers"].values():
        table.add_row(row_label(row["optimizer"], row["shadow"]), _mb(row["lora_param_bytes"]), _mb(row["state_bytes"]),
                      _mb(row["grad_bytes"]), _mb(row["base_bytes"]), _mb(row["total_bytes"]),
                      _delta(row["delta_vs_emocats_bytes"]), _mb(row["training_step_bytes"]))
    text = _render(table)
    ref = p["reference"]
    lines = [
        "All in MB = 10^6 bytes. LoRA weights and gradients fp32. Base: UNet + both text encoders + VAE (VAE fp32).",
        f"Train step: Total less what emotrain frees once latents and captions are cached (it keeps {kept}).",
        "Not included: activations, CUDA context, allocator slack (the same for every optimizer).",
        "LoRA parameters by layer kind:"]
    for kind, v in p["lora_params_by_layer"].items():
        lines.append(f"  {kind:34s} {v['modules']:5d} modules {v['params']:>14,} params")
    if p["model"] == "tiny":
        return text + "\n".join(lines) + "\n"
    lines.append(
        "Published claim (optim/SPEC.md section 10): a rank-32 LoRA on the attention layers, about 85 M params, one fp32 state "
        "about 340 MB; EmoSens +1 state, EmoAiry about -1 state vs EmoCats.")
    lines.append(
        f"Here (rank {p['rank']}): transformer blocks (attention + feed-forward + proj_in/out, kohya's default "
        f"UNet targets) {ref['transformer_blocks_params']:,} params = {_mb(ref['one_fp32_state_bytes_transformer_blocks'])} MB "
        f"per fp32 state; attention projections alone {ref['attention_only_params']:,}; this LoRA "
        f"{p['lora_params']:,} = {_mb(ref['one_fp32_state_bytes'])} MB per fp32 state.")
    return text + "\n".join(lines) + "\n"


def format_markdown(p: dict) -> str:
    """The plan's table as Markdown, for results files."""
    head = ("| Optimizer | LoRA params MB | Opt. state MB | Gradients MB | Base weights MB | Total MB "
            "| vs EmoCats MB | Training step MB |")
    lines = [head, "|---|" + "---:|" * 7]
    for row in p["optimizers"].values():
        lines.append(f"| {row_label(row['optimizer'], row['shadow'])} | {_mb(row['lora_param_bytes'])} | "
                     f"{_mb(row['state_bytes'])} | {_mb(row['grad_bytes'])} | {_mb(row['base_bytes'])} | "
                     f"{_mb(row['total_bytes'])} | {_delta(row['delta_vs_emocats_bytes'])} | "
                     f"{_mb(row['training_step_bytes'])} |")
    return "\n".join(lines) + "\n"


# -- measured memory -------------------------------------------------------------------

def process_peak_rss_bytes() -> int:
    """Peak resident set size of this process."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def cuda_memory_report(device=None) -> dict | None:
    """Peak CUDA memory allocated and reserved by torch since the last reset, or None
    without CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.type != "cuda":
        return None
    return {"device": torch.cuda.get_device_name(device),
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device))}


def _has_shadow(opt) -> bool:
    return any(isinstance(st, dict) and "shadow" in st for st in opt.state.values())


def _real_lora_unet(model: str, rank: int, alpha: float, conv_rank, conv_alpha, device, dtype):
    from diffusers import UNet2DConditionModel

    from .sdxl import add_lora, load_config, resolve_model, unet_lora_config

    if model == "sdxl":
        # Weights do not change any byte counted here; random ones avoid the download,
        # and initialising them on the device spares minutes of CPU init for 2.6 B params.
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(load_config("sdxl_unet"))
    else:
        source = resolve_model(model)
        if Path(source).is_file():
            raise UserError("--measure needs a diffusers folder, 'tiny' or 'sdxl' (random weights), not a single file")
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    # diffusers warns on any .to(dtype=...), even a no-op one
    unet.to(device) if dtype == torch.float32 else unet.to(device=device, dtype=dtype)
    add_lora(unet, unet_lora_config(rank, alpha, conv_rank, conv_alpha))
    unet.to(device)
    return unet


def _random_batch(config, batch_size: int, resolution: int | None, device, generator):
    side = (resolution // 8) if resolution else config.sample_size
    time_dim = 6 * config.addition_time_embed_dim
    shapes = {"latents": (batch_size, config.in_channels, side, side),
              "hidden": (batch_size, 77, config.cross_attention_dim),
              "pooled": (batch_size, config.projection_class_embeddings_input_dim - time_dim)}
    batch = {k: torch.randn(s, generator=generator).to(device) for k, s in shapes.items()}
    batch["time_ids"] = torch.tensor([side * 8, side * 8, 0, 0, side * 8, side * 8],
                                     dtype=torch.float32).repeat(batch_size, 1).to(device)
    return batch


def measure(model: str = "tiny", optims="all", steps: int = 3, rank: int = 16, alpha: float | None = None,
            conv_rank: int | None = None, conv_alpha: float | None = None, shadow="both",
            mixed_precision: str = "no", batch_size: int = 1, resolution: int | None = None,
            device: str | None = None, seed: int = 0, lr: float = 1e-4,
            optim_args: dict[str, dict] | None = None, gradient_checkpointing: bool = False) -> dict:
    """Run ``steps`` real training steps per optimizer on the UNet with the training LoRA
    and compare the optimizer state it really holds with the plan's figure.

    Shadow-on rows tell the optimizer a loss that jumps on step 2 (``EMOTION_JUMP``), so
    the lazily allocated shadow buffer exists by the end (needs steps >= 2); each row says
    on which step the shadow appeared, or that it did not.
    """
    from diffusers import DDPMScheduler

    from .sdxl import denoising_loss, load_config

    if steps < 1:
        raise UserError("--steps must be at least 1")
    if mixed_precision not in PRECISIONS:
        raise UserError(f"mixed precision must be one of {', '.join(PRECISIONS)}, got {mixed_precision!r}")
    alpha = float(rank if alpha is None else alpha)
    names = parse_optims(optims)
    rows = _rows(names, shadow_settings(shadow))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = PRECISIONS[mixed_precision]

    planned = plan(model, rank, alpha, conv_rank, conv_alpha, names, shadow, mixed_precision, False, optim_args)
    torch.manual_seed(seed)
    unet = _real_lora_unet(model, rank, alpha, conv_rank, conv_alpha, device, dtype)
    unet.train()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler.from_config(load_config("sdxl_scheduler"))  # the tiny model shares it
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    results = {}
    for name, s in rows:
        key = row_key(name, s)
        for p in params:
            p.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        opt = build_optimizer(name, params, lr, shadow=s, args=(optim_args or {}).get(name))
        shadow_step, losses = None, []
        for step in range(1, steps + 1):
            batch = _random_batch(unet.config, batch_size, resolution, device, generator)
            with autocast:  # the training loop's own loss, on random latents and conditioning
                loss = denoising_loss(unet, scheduler, batch["latents"], batch["hidden"], batch["pooled"],
                                      batch["time_ids"], generator)
            loss.backward()
            value = loss.item()
            losses.append(value)
            if takes_loss(opt):
                told = value + (EMOTION_JUMP if s and step == 2 else 0.0)
                opt.step(loss=told)
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            if s and shadow_step is None and _has_shadow(opt):
                shadow_step = step
        measured = measure_state_bytes(opt)
        planned_bytes = planned["optimizers"][key]["state_bytes"]
        results[key] = {
            "optimizer": name, "shadow": s, "planned_state_bytes": planned_bytes,
            "measured_state_bytes": measured, "match": measured == planned_bytes,
            "shadow_allocated_step": shadow_step, "losses": losses,
            "cuda": cuda_memory_report(device) if device.type == "cuda" else None,
        }
        del opt
    return {"model": model, "device": str(device), "steps": steps, "rank": rank, "conv_rank": planned["conv_rank"],
            "mixed_precision": mixed_precision, "batch_size": batch_size, "resolution": resolution,
            "gradient_checkpointing": gradient_checkpointing, "lora_params": planned["lora_params"],
            # measure holds what a training step holds: the UNet, its LoRA, gradients, state
            "planned_train_step_bytes": {k: v["training_step_bytes"] for k, v in planned["optimizers"].items()},
            "optimizers": results, "peak_rss_bytes": process_peak_rss_bytes()}


def format_measure(m: dict) -> str:
    """Planned and measured optimizer state side by side."""
    from rich.table import Table

    table = Table(title=f"Planned vs measured optimizer state: {m['model']} on {m['device']}, rank {m['rank']}, "
                        f"{m['steps']} steps, {m['lora_params']:,} LoRA params",
                  caption="bytes exact; MB = 10^6 bytes")
    cuda = any(r["cuda"] for r in m["optimizers"].values())
    cols = ["Optimizer", "Planned state B", "Measured state B", "Match", "Shadow buffer"]
    if cuda:
        cols += ["Planned train step MB (no activations)", "CUDA peak alloc MB", "CUDA peak reserved MB"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("Optimizer", "Shadow buffer", "Match") else "right")
    for key, r in m["optimizers"].items():
        if not r["shadow"]:
            sh = "-"
        elif r["shadow_allocated_step"] is None:
            sh = "NOT allocated yet (measured excludes it)"
        else:
            sh = f"allocated at step {r['shadow_allocated_step']}"
        cells = [row_label(r["optimizer"], r["shadow"]), f"{r['planned_state_bytes']:,}",
                 f"{r['measured_state_bytes']:,}", "yes" if r["match"] else "NO", sh]
        if cuda:
            c = r["cuda"] or {}
            cells += [_mb(m["planned_train_step_bytes"][key]), _mb(c.get("peak_allocated_bytes", 0)),
                      _mb(c.get("peak_reserved_bytes", 0))]
        table.add_row(*cells)
    return _render(table) + f"Peak RSS of this process: {_mb(m['peak_rss_bytes'])} MB\n"
