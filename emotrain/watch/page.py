"""report.html: one self-contained page (plots and sample images inline as base64),
for one run or several side by side."""

from __future__ import annotations

import base64
import io
import os
from html import escape
from pathlib import Path

from ..options import shareable

THUMB = 512  # samples larger than this are shown scaled down (the PNG itself stays in samples/)
STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .5em;font-size:.9em}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure.plot{display:inline-block;margin:.5em;vertical-align:top}figure.plot img{max-width:100%}
figcaption,.note{font-size:.85em;color:#555}.grid img{width:160px;image-rendering:pixelated}
.grid td{vertical-align:top;text-align:center}"""


def _num(value, fmt="{:.4g}") -> str:
    return "-" if value is None else fmt.format(value)


def _bytes(n) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def _seconds(s) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def summary_table(rows: list[dict]) -> str:
    head = ("run", "status", "steps", "final loss (smoothed)", "final val loss", "best val loss (step)",
            "train time", "it/s", "optimizer state", "peak memory")
    out = ["<table class='summary'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in rows:
        best = "-" if r["best_val_loss"] is None else f"{r['best_val_loss']:.5g} ({r['best_val_step']})"
        cells = [escape(r["run"]), escape(str(r["status"])), _num(r["steps"], "{}"), _num(r["final_loss"]),
                 _num(r["final_val_loss"], "{:.5g}") + (f" (EMA {r['final_val_loss_ema']:.5g})"
                                                         if r.get("final_val_loss_ema") is not None else ""), best, _seconds(r["train_seconds"]), _num(r["it_per_s"], "{:.3g}"),
                 _bytes(r["optimizer_state_bytes"]), _num(r["peak_memory_mib"], "{:,.0f} MiB")]
        out.append("<tr>" + "".join(f"<td{' class=num' if i > 1 else ''}>{c}</td>" for i, c in enumerate(cells)) + "</tr>")
    return "\n".join(out) + "</table>"


def figure_html(fig: dict) -> str:
    note = f"<figcaption>{escape(fig['note'])}</figcaption>" if fig["note"] else ""
    if fig["png"] is None:
        return f"<p class='note' id='fig-{fig['id']}'>{escape(fig['title'])}: {escape(fig['note'])}</p>"
    return (f"<figure class='plot' id='fig-{fig['id']}'><img alt='{escape(fig['title'])}' "
            f"src='data:image/png;base64,{fig['png']}'>{note}</figure>")


def image_data(path: Path) -> str:
    """A sample as a data: URI: the PNG itself when small, else a scaled-down JPEG."""
    from PIL import Image

    with Image.open(path) as img:
        if max(img.size) <= THUMB:
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        img = img.convert("RGB")
        img.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(path: Path, out: Path, title: str) -> str:
    href = os.path.relpath(path, out.parent)
    return f"<a href='{escape(href)}'><img class='sample' alt='{escape(title)}' src='{image_data(path)}'></a>"


def sample_grids(runs, out: Path) -> str:
    """One run: prompts down, steps across. Several: one table per prompt, steps down,
    runs across, so each step's pictures sit side by side."""
    if not any(run.samples for run in runs):
        return "<p class='note'>No samples (pass --sample-prompt or --sample-prompts).</p>"
    prompts = {k: text for run in runs for k, text in run.prompts.items()}
    steps = sorted({s for run in runs for s, _ in run.samples})
    parts = []
    if len(runs) == 1:
        run = runs[0]
        parts.append("<table class='grid'><tr><th>prompt</th>" + "".join(f"<th>step {s}</th>" for s in steps) + "</tr>")
        for k in sorted(prompts):
            cells = "".join(f"<td>{_img(run.samples[(s, k)], out, f'step {s}') if (s, k) in run.samples else ''}</td>"
                            for s in steps)
            parts.append(f"<tr><th>{escape(prompts[k])}</th>{cells}</tr>")
        return "\n".join(parts) + "</table>"
    for k in sorted(prompts):
        parts.append(f"<h3>{escape(prompts[k])}</h3><table class='grid'><tr><th>step</th>"
                     + "".join(f"<th>{escape(run.label)}</th>" for run in runs) + "</tr>")
        for s in steps:
            cells = "".join(f"<td>{_img(run.samples[(s, k)], out, run.label) if (s, k) in run.samples else ''}</td>"
                            for run in runs)
            parts.append(f"<tr><th>{s}</th>{cells}</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def differences(runs) -> str:
    """The settings that differ between the runs (what the comparison is about)."""
    if len(runs) < 2:
        return ""
    keys = sorted({k for run in runs for k in run.config} - {"output"})
    differ = [k for k in keys if len({repr(run.config.get(k)) for run in runs}) > 1]
    return f"<p>Settings that differ: {escape(', '.join(differ) or 'none')}.</p>" if differ or keys else ""


def page(title: str, runs, figures: list[dict], rows: list[dict], out: Path, intro: str = "") -> str:
    config = shareable(runs[0].config) if len(runs) == 1 else {}  # the page gets shared: names, not paths
    settings = ", ".join(f"{k}={v}" for k, v in config.items() if v not in (None, [], "")) if config else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title><style>{STYLE}</style></head>
<body><h1>{escape(title)}</h1>
{intro}
{summary_table(rows)}
{differences(runs)}
{f"<p class='note'>{escape(settings)}</p>" if settings else ""}
<h2>Curves</h2>
<section id="figures">
{chr(10).join(figure_html(f) for f in figures)}
</section>
<h2>Samples</h2>
<section id="samples">
{sample_grids(runs, out)}
</section>
</body></html>
"""
