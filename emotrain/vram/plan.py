"""The VRAM plan of a run, per optimizer, without loading a weight.

The model is built on the meta device with the LoRA the run would train, each optimizer
is constructed on those parameters and allocates its own state there (state.py), and the
bytes are read back the way a real run's are: plan and measurement cannot drift apart
when an optimizer changes its state layout.
"""

from __future__ import annotations

import time

import torch

from .. import sdxl
from ..dataset import Needs
from ..errors import UserError
from ..lora import fast
from ..lora.inject import meta_sdxl
from ..lora.kinds import kind_of_layer
from ..lora.live import frozen_tensors, zero_start_parameters
from ..optimizers import EMO, NAMES, parse_optim_args
from ..precision import weight_dtype
from .activations import step_activations
from .state import planned_state_bytes

MB = 1_000_000  # the published claim (340 MB for 85 M fp32 values) is in decimal megabytes
REFERENCE = "emocats"  # the published figures are relative to EmoCats, shadow off
SHADOW_CHOICES = ("off", "on", "both")


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
        return list(NAMES)
    items = optims.split(",") if isinstance(optims, str) else list(optims)
    names = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip()
            if name == "all":
                names.extend(n for n in NAMES if n not in names)
            elif name and name not in names:
                names.append(name)
    if not names:
        raise UserError("no optimizer given: pass --optim all or a comma-separated list such as emosens,adamw")
    return names


def lora_parameters(modules: dict) -> list[torch.nn.Parameter]:
    return [p for m in modules.values() for p in m.parameters() if p.requires_grad]


def _lora_breakdown(modules: dict) -> dict[str, dict]:
    """LoRA parameters per layer kind, from the module names that carry a LoRA."""
    out = {kind: {"modules": 0, "params": 0} for kind, _ in sdxl.LAYER_KINDS}
    for component, module in modules.items():
        for name, sub in module.named_modules():
            kind = kind_of_layer(sub)
            if kind is None:
                continue
            n = kind.layer_parameters(sub)
            entry = out.setdefault(sdxl.layer_kind(f"{component}.{name}" if component != "unet" else name),
                                   {"modules": 0, "params": 0})
            entry["modules"] += 1
            entry["params"] += n
    return {k: v for k, v in out.items() if v["modules"]}


def adapter_transient_bytes(modules: dict) -> int:
    """DoRA's weight norm: each DoRA layer's forward forms its adapted weight, W + delta, and
    the delta alone in float32 (peft's DoraLinearLayer), freed before the next layer: two
    copies of the largest adapted weight at once. The other kinds keep no such copy."""
    sizes = [sub.get_base_layer().weight.numel() for m in modules.values() for _, sub in m.named_modules()
             if getattr(kind_of_layer(sub), "name", None) == "dora"]
    return 2 * 4 * max(sizes, default=0)


def _module_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the frozen weights (and buffers) once cast to ``dtype``; LoRA excluded."""
    total = 0
    for t in frozen_tensors(module):
        size = torch.empty((), dtype=dtype).element_size() if t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


def base_weight_bytes(modules: dict, mixed_precision: str = "no", fp8_base: bool = False) -> dict[str, int]:
    """Frozen weights per component at the training precision; the VAE stays fp32,
    as training keeps it (SDXL's VAE overflows in fp16). With ``fp8_base`` the UNet's
    layers that --fp8-base stores in float8 (sdxl.fp8_layers) count one byte a value,
    the rest of the UNet its training precision."""
    dtype = weight_dtype(mixed_precision)
    out = {name: _module_bytes(m, torch.float32 if name == "vae" else dtype) for name, m in modules.items()}
    if fp8_base:
        stored = sdxl.fp8_frozen_bytes(modules["unet"])  # values, one byte each
        out["unet"] -= stored * torch.empty((), dtype=dtype).element_size() - stored
    return out


def row_key(name: str, shadow: bool) -> str:
    return f"{name}-shadow" if shadow else name


def plan_rows(names: list[str], shadows: tuple[bool, ...]) -> list[tuple[str, bool]]:
    rows = []
    for name in names:
        if name in EMO:
            rows.extend((name, s) for s in shadows)
        else:
            rows.append((name, False))
    return rows


def network_lora_configs(cfg) -> dict:
    """The peft configs of --network-weights per component (its ranks and targets win)."""
    if not cfg.network_weights:
        return {}
    from ..lora.formats import load_lora_file
    from ..lora.inject import lora_config_for
    start = load_lora_file(cfg.network_weights)
    return {c: lora_config_for(start, c) for c in ("unet", "text_encoder", "text_encoder_2")}


def resident_components(cfg) -> tuple[str, ...]:
    """What the loop keeps loaded: the UNet; the text encoders when they train or the
    captions change per draw (shuffle, dropout: encoded every step); the VAE when random
    crops are encoded every step."""
    needs = Needs.of(cfg)
    text = cfg.train_text_encoders or needs.text_encoders
    return ("unet",) + (("text_encoder", "text_encoder_2") if text else ()) + (("vae",) if needs.vae else ())


def plan(cfg, optims=None, shadow=None, activations: bool = True) -> dict:
    """Memory of the run ``cfg`` describes, per optimizer, in bytes: LoRA weights (fp32),
    optimizer state, gradients (fp32), frozen base weights, under bf16/fp16 the fused
    forward's 2-byte copies of the LoRA factors (``fused_copy_bytes``, lora/fast.py) and, with
    --ema-decay, the EMA's fp32 copy of the LoRA (``ema_bytes``: 0 when --ema-on-cpu keeps
    it in CPU memory).
    ``optims`` (default: the config's optimizer) and ``shadow`` (``"off"``/``"on"``/``"both"``, default: the
    config's setting) widen it into a comparison table. The config's optimizer arguments
    apply to every optimizer planned. With ``activations``, the step's activations
    (traced, activations.py; the same for every optimizer) and the workspace/allocator
    margin complete each row's ``peak_bytes``: the planned peak of a training step.

    ``total_bytes`` holds every frozen network (UNet, text encoders, VAE), as a trainer
    that keeps them loaded needs; ``training_step_bytes`` holds only what emotrain's loop
    keeps once latents and captions are cached (``resident_components``).
    ``sampling_bytes``: the weights a sample during training holds (activations of the
    sample not included)."""
    started = time.perf_counter()
    rows = plan_rows(parse_optims(optims or cfg.optim), shadow_settings(cfg.shadow if shadow is None else shadow))
    modules = meta_sdxl(cfg, network_lora_configs(cfg))
    params = lora_parameters(modules)
    lora_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = lora_bytes  # gradients take the dtype of the fp32 LoRA weights
    # --ema-decay: one fp32 copy of every LoRA parameter (run/ema.py), on the GPU unless --ema-on-cpu
    ema_decay, ema_cpu = getattr(cfg, "ema_decay", 0.0), getattr(cfg, "ema_on_cpu", False)
    ema_total = 4 * sum(p.numel() for p in params) if ema_decay else 0
    ema_bytes = 0 if ema_cpu else ema_total
    base = base_weight_bytes(modules, cfg.mixed_precision, getattr(cfg, "fp8_base", False))
    base_total = sum(base.values())
    # --fp8-base: one stored layer at a time holds its bf16 copy while it computes
    fp8_cast = sdxl.fp8_cast_bytes(modules["unet"]) if getattr(cfg, "fp8_base", False) else 0
    transient = adapter_transient_bytes(modules) + fp8_cast
    # the fused LoRA forward's low-precision factor copies (lora/fast.py), held between steps;
    # --compile gives the repeated blocks' layers back to peft's forward (lora/start.py)
    traced_copies = sum(fast.copy_bytes(m, cfg.mixed_precision) for m in modules.values())
    compiled = sdxl.repeated_blocks(modules["unet"]) if getattr(cfg, "compile", False) else []
    copies = traced_copies - sum(fast.copy_bytes(b, cfg.mixed_precision) for b in compiled)
    resident = resident_components(cfg)
    # Sampling brings back what caching freed: the VAE and frozen text encoders
    # (--sample-keep-models keeps them on the GPU all run instead).
    for_samples = tuple(c for c in ("text_encoder", "text_encoder_2", "vae") if c not in resident)
    if cfg.sample_keep_models:
        resident, for_samples = tuple(resident) + for_samples, ()
    base_resident = sum(base[c] for c in resident)
    sample_models = sum(base[c] for c in for_samples)
    args = parse_optim_args(cfg.optim_args)

    # A fresh adapter's up weights start at zero; a --network-weights file's do not.
    zero = [] if cfg.network_weights else zero_start_parameters(modules.values())
    states = {(name, s): planned_state_bytes(name, params, shadow=s, args=args, zero_start=zero)
              for name, s in dict.fromkeys(rows + [(REFERENCE, False)])}
    reference_total = lora_bytes + grad_bytes + base_total + transient + ema_bytes + copies \
        + states[(REFERENCE, False)]
    out_rows = {}
    for name, s in rows:
        state = states[(name, s)]
        total = lora_bytes + state + grad_bytes + base_total + transient + ema_bytes + copies
        out_rows[row_key(name, s)] = {
            "optimizer": name, "shadow": s, "lora_param_bytes": lora_bytes, "state_bytes": state,
            "ema_bytes": ema_bytes, "fused_copy_bytes": copies,
            "grad_bytes": grad_bytes, "base_bytes": base_total, "total_bytes": total,
            "delta_vs_emocats_bytes": total - reference_total,
            "training_step_bytes": total - base_total + base_resident,
            # during a sample: no gradients, the parked models back on the device
            "sampling_bytes": total - base_total + base_resident - grad_bytes + sample_models,
        }
    breakdown = _lora_breakdown(modules)
    encoders = tuple(modules[c] for c in ("text_encoder", "text_encoder_2")) if cfg.train_text_encoders else ()
    acts, untraced = None, None
    if activations:
        from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
        try:
            acts = step_activations(cfg, modules["unet"], encoders=encoders)
        except (DataDependentOutputException, DynamicOutputShapeException):
            # a forward that reads a tensor's value (as peft's LoHa/LoKr layers did before
            # lora/lycoris.py's _Steady) cannot run on fake tensors: no activation figure
            # then (the rest is exact).
            acts = None
            untraced = (f"activations: not planned for --adapter {getattr(cfg, 'adapter', 'lora')} (its layers "
                        "cannot be traced without weights yet); the figures below leave them out")
    if acts:
        # The trace's first fused layer allocates the factor copies, which then live on: they
        # are in its peak, and counted above with what stays between steps.
        acts = {**acts, "activation_bytes": acts["activation_bytes"] - traced_copies}
        margin = acts["rounding_bytes"] + acts["workspace_bytes"]
        for row in out_rows.values():
            # One step's peak. Parts another option adds (an EMA copy, another adapter
            # kind's extra tensors) belong in training_step_bytes, which this sums.
            row.update(activation_bytes=acts["activation_bytes"], margin_bytes=margin,
                       peak_bytes=row["training_step_bytes"] + acts["activation_bytes"] + margin)
    by_component = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in modules.items()}
    attention = breakdown.get("attention", {}).get("params", 0)
    transformer = sum(breakdown.get(k, {}).get("params", 0) for k in sdxl.TRANSFORMER_KINDS)
    return {
        "model": cfg.model or "sdxl", "rank": cfg.rank, "alpha": cfg.effective_alpha,
        "conv_rank": cfg.effective_conv_rank if cfg.targets == "full" else 0, "conv_alpha": cfg.effective_conv_alpha,
        "mixed_precision": cfg.mixed_precision, "fp8_base": cfg.fp8_base, "train_text_encoders": cfg.train_text_encoders,
        "targets": cfg.targets, "network_weights": cfg.network_weights, "adapter": cfg.adapter,
        "adapter_transient_bytes": transient - fp8_cast, "fp8_cast_bytes": fp8_cast, "fused_copy_bytes": copies,
        "ema": {"decay": ema_decay, "bytes": ema_total, "on": "cpu" if ema_cpu else "gpu"}
        if ema_total else None,
        "lora_params": sum(p.numel() for p in params), "lora_tensors": len(params),
        "lora_modules": sum(v["modules"] for v in breakdown.values()),
        "lora_params_by_component": {k: v for k, v in by_component.items() if v},
        "lora_params_by_layer": breakdown,
        "base_bytes_by_component": base,
        "resident_while_training": list(resident),
        "sampling": {"models": list(for_samples), "models_bytes": sample_models,
                     "keep_models": cfg.sample_keep_models},
        # Where the published "+-300 MB" comes from: one fp32 value per LoRA weight of the
        # UNet's transformer blocks (kohya's default LoRA targets), at this rank.
        "reference": {"optimizer": REFERENCE, "shadow": False, "total_bytes": reference_total,
                      "attention_only_params": attention, "transformer_blocks_params": transformer,
                      "one_fp32_state_bytes": lora_bytes,
                      "one_fp32_state_bytes_transformer_blocks": transformer * 4},
        "unit": "bytes", "mb": MB,
        "optimizers": out_rows,
        "activations": acts,
        "activations_untraced": untraced,
        "resolution": cfg.resolution, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "seconds": round(time.perf_counter() - started, 2),
    }
