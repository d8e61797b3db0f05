"""The plan and the measurement as tables: rich for the terminal, Markdown for results files."""

from __future__ import annotations

import io

from ..optimizers import DISPLAY
from .plan import MB

def _mb(n: int) -> str:
    return f"{n / MB:,.1f}"


def _delta(n: int) -> str:
    return "0" if n == 0 else f"{n / MB:+,.1f}"


def row_label(name: str, shadow: bool) -> str:
    return DISPLAY.get(name, name) + (" + shadow" if shadow else "")


def _render(table, width: int = 120) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(table)
    return console.file.getvalue()


def format_table(p: dict) -> str:
    """The plan as a table (rich), with the LoRA breakdown and the published claim."""
    from rich.table import Table

    te = " + text-encoder LoRA" if p["train_text_encoders"] else ""
    kind = (f"full-layer LoRA rank {p['rank']} (conv {p['conv_rank']})" if p.get("targets", "full") == "full"
            else f"transformer-block LoRA rank {p['rank']}")
    title = (f"VRAM plan: {p['model']}, {kind}{te}, "
             f"{p['lora_params']:,} LoRA params, base weights {p['mixed_precision'] if p['mixed_precision'] != 'no' else 'fp32'}"
             + (" (UNet layers stored in fp8)" if p.get("fp8_base") else ""))
    kept = " + ".join(p["resident_while_training"])
    table = Table(title=title)
    acts = p.get("activations")
    ema = p.get("ema")
    cols = ["Optimizer", "LoRA", "Opt. state", "Grads"] + (["EMA"] if ema and ema["on"] == "gpu" else [])
    cols += ["Base", "Total", "vs EmoCats", "Train step"]
    cols += ["Activations", "Margin", "Peak", "Peak GiB"] if acts else []
    fits = any("fit" in row for row in p["optimizers"].values())
    cols += ["Fits?"] if fits else []
    for col in cols:
        table.add_column(col, justify="left" if col in ("Optimizer", "Fits?") else "right", no_wrap=True)
    for row in p["optimizers"].values():
        cells = [row_label(row["optimizer"], row["shadow"]), _mb(row["lora_param_bytes"]), _mb(row["state_bytes"]),
                 _mb(row["grad_bytes"])] + ([_mb(row["ema_bytes"])] if "EMA" in cols else [])
        cells += [_mb(row["base_bytes"]), _mb(row["total_bytes"]),
                 _delta(row["delta_vs_emocats_bytes"]), _mb(row["training_step_bytes"])]
        if acts:
            cells += [_mb(row["activation_bytes"]), _mb(row["margin_bytes"]), _mb(row["peak_bytes"]),
                      f"{row['peak_bytes'] / 2**30:.2f}"]
        if fits:
            cells.append(row["fit"]["text"])
        table.add_row(*cells)
    text = _render(table, 120 + (60 if acts else 0) + (36 if fits else 0))
    ref = p["reference"]
    lines = [
        "All in MB = 10^6 bytes. LoRA weights and gradients fp32. Base: UNet + both text encoders + VAE (VAE fp32).",
        f"Train step: Total less what emotrain frees once latents and captions are cached (it keeps {kept}"
        + (": the data changes per draw" if len(p["resident_while_training"]) > (3 if p["train_text_encoders"] else 1)
           else "") + ").",
        _activations_line(p),
        *([f"EMA (--ema-decay {ema['decay']:g}): one fp32 copy of the LoRA, {_mb(ema['bytes'])} MB, "
           + ("on the GPU (in every total)." if ema["on"] == "gpu" else "in CPU memory (--ema-on-cpu): not in the "
              "GPU totals.")] if ema else []),
        *([f"Fused LoRA forward: {p['mixed_precision']} copies of the LoRA factors, {_mb(p['fused_copy_bytes'])} MB, "
           "held between steps (in Total and Train step, not in Activations)."] if p.get("fused_copy_bytes") else []),
        _sampling_line(p),
        "LoRA parameters by layer kind:"]
    for kind, v in p["lora_params_by_layer"].items():
        lines.append(f"  {kind:34s} {v['modules']:5d} modules {v['params']:>14,} params")
    if p["model"] == "tiny":
        return text + "\n".join(lines) + "\n"
    lines.append(
        "Published claim (optim/SPEC.md section 10): a rank-32 LoRA on the attention layers, about 85 M params, "
        "one fp32 state about 340 MB; EmoSens +1 state, EmoAiry about -1 state vs EmoCats.")
    lines.append(
        f"Here (rank {p['rank']}): transformer blocks (attention + feed-forward + proj_in/out, kohya's default "
        f"UNet targets) {ref['transformer_blocks_params']:,} params = {_mb(ref['one_fp32_state_bytes_transformer_blocks'])} MB "
        f"per fp32 state; attention projections alone {ref['attention_only_params']:,}; this LoRA "
        f"{p['lora_params']:,} = {_mb(ref['one_fp32_state_bytes'])} MB per fp32 state.")
    return text + "\n".join(lines) + "\n"


def _activations_line(p: dict) -> str:
    a = p.get("activations")
    if not a and p.get("activations_untraced"):
        return p["activations_untraced"][0].upper() + p["activations_untraced"][1:] + "."
    if not a:
        return "Not included: activations, CUDA context, allocator slack (the same for every optimizer)."
    t = a["trace"]
    how = "from the cache" if a["cached"] else f"traced in {t['trace_seconds']} s"
    return (f"Peak = Train step + Activations + Margin: one training step of batch {t['batch']} at the largest bucket "
            f"({t['latents'][0] * 8}x{t['latents'][1] * 8} px), checkpointing {'on' if p['gradient_checkpointing'] else 'off'}, "
            f"{'grad-accum ' + str(p['grad_accum']) if p['grad_accum'] > 1 else 'one micro-batch'}; activations "
            f"{how} ({t['tensors']:,} tensors). Margin: CUDA allocator rounding from the trace "
            f"({_mb(a['rounding_bytes'])} MB) + cuBLAS workspaces ({_mb(a['workspace_bytes'])} MB). "
            "Not included: the CUDA context (outside torch's allocator), cuDNN workspaces, allocator slack (reserved).")


def _sampling_line(p: dict) -> str:
    """What sample images during training cost, in the plan's own figures."""
    s = p["sampling"]
    if s["keep_models"]:
        return ("Samples: --sample-keep-models keeps the VAE and text encoders on the GPU all run (in Train step); "
                "a sample adds only its activations.")
    peak = max(r["sampling_bytes"] for r in p["optimizers"].values())
    names = {"text_encoder": "text encoder 1", "text_encoder_2": "text encoder 2", "vae": "VAE"}
    return (f"Samples: the {' + '.join(names[m] for m in s['models'])} ({_mb(s['models_bytes'])} MB) move to the GPU for each sample "
            f"and back to the CPU after (gradients are freed then): up to {_mb(peak)} MB of weights and state "
            f"while sampling, plus the sample's activations; --sample-keep-models keeps them on the GPU "
            f"(+{_mb(s['models_bytes'])} MB on every step).")


def format_measure(m: dict) -> str:
    """Planned and measured optimizer state side by side."""
    from rich.table import Table

    table = Table(title=f"Planned vs measured optimizer state: {m['model']} on {m['device']}, rank {m['rank']}, "
                        f"{m['steps']} steps, {m['lora_params']:,} LoRA params, "
                        f"{m.get('prediction_type', 'epsilon')} target",
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
