"""The report's plots (matplotlib, no display needed), one PNG per figure, every run on
the same axes in its own colour."""

from __future__ import annotations

import base64
import io

from .runs import RunView, validation_mismatch

WIDTH, HEIGHT, DPI = 7.5, 3.2, 100


def _lines(runs, key, **style):
    return [dict(run=i, x=run.series(key)[0], y=run.series(key)[1], **style)
            for i, run in enumerate(runs) if run.series(key)[0]]


def loss(runs):
    return _lines(runs, "train/loss", alpha=0.25, lw=0.8) + _lines(runs, "train/loss_smoothed", lw=1.8, named=True), ""


def validation(runs):
    if not runs:
        return [], ""
    kept, notes = [], []
    for i, run in enumerate(runs):
        why = validation_mismatch(runs[0], run) if i else None
        if why and run.series("val/loss")[0]:
            notes.append(f"{run.folder.name} not overlaid: {why} than {runs[0].folder.name}")
        elif not why:
            kept.append(run)
    lines = [dict(run=runs.index(r), x=r.series("val/loss")[0], y=r.series("val/loss")[1], marker="o", ms=3, lw=1.5,
                  named=True) for r in kept if r.series("val/loss")[0]]
    ema = [dict(run=runs.index(r), x=r.series("val/loss_ema")[0], y=r.series("val/loss_ema")[1], marker="s", ms=3,
                lw=1.2, ls="--") for r in kept if r.series("val/loss_ema")[0]]  # --ema-decay
    if ema:
        notes.insert(0, "solid: the trained weights; dashed: their EMA (--ema-decay)")
    return lines + ema, "; ".join(notes)


def learning_rate(runs):
    emo = _lines(runs, "emotion/effective_lr", lw=1.0, ls="--")
    free = _lines(runs, "optim/effective_lr", lw=1.0, ls="--")  # Prodigy, schedule-free
    prodigy = [runs[line["run"]].config.get("optim") == "prodigy" for line in free]
    what = [w for w, on in (("lr x (1 - |s|) for the Emo family", emo), ("d x lr for Prodigy", any(prodigy)),
                            ("the warm-up lr for schedule-free", not all(prodigy))) if on]
    groups = sorted({k for run in runs for r in run.metrics for k in r if k.startswith("train/lr/")})
    parts = [line for key in groups for line in _lines(runs, key, lw=1.0, ls=":")]  # per-part lrs where they differ
    lines = _lines(runs, "train/lr", lw=1.5, named=True) + emo + free + parts
    notes = ([f"dashed: effective step size, {'; '.join(what)}"] if what else []) + \
        ([f"dotted: each parameter group's lr ({', '.join(k[len('train/lr/'):] for k in groups)})"] if groups else [])
    return lines, "; ".join(["solid: scheduled lr", *notes]) if notes else ""


def emotion(runs):
    lines = _lines(runs, "emotion/s", lw=1.2, named=True) + [
        line for line in _lines(runs, "emotion/shadow_ratio", lw=1.0, ls=":") if runs[line["run"]].config.get("shadow")]
    others = [r.folder.name for r in runs if not r.series("emotion/s")[0]]
    note = "solid: emotion scalar s; dotted: shadow ratio" if any(r.config.get("shadow") for r in runs) else ""
    if others and lines:
        note = "; ".join(filter(None, [note, f"no emotion scalar in {', '.join(others)} (not an Emo optimizer)"]))
    return lines, note


def filter_held_back(runs):
    return _lines(runs, "emotion/filter_held_back", marker=".", lw=1.0, named=True), ""


def grad_norm(runs):
    return _lines(runs, "train/grad_norm", marker=".", lw=1.0, named=True), ""


def memory(runs):
    return _lines(runs, "memory/peak_mib", lw=1.5, named=True) + _lines(runs, "memory/now_mib", lw=1.0, ls="--"), \
        "solid: peak; dashed: now (CUDA allocator on a GPU, process resident set on the CPU)"


# id, title, y label, builder, log scale
FIGURES = [
    ("loss", "Training loss (thin: every step; thick: smoothed)", "loss", loss, False),
    ("val", "Validation loss (fixed noise and timesteps)", "loss", validation, False),
    ("lr", "Learning rate and effective step size", "lr", learning_rate, "wide"),
    ("emotion", "Emotion scalar s", "s", emotion, False),
    ("filter", "Fraction of gradient elements the filter held back", "fraction", filter_held_back, False),
    ("grad_norm", "Gradient norm before clipping", "norm", grad_norm, True),
    ("memory", "Memory", "MiB", memory, False),
]


def render(title: str, ylabel: str, lines: list, runs: list[RunView], log: bool) -> str:
    """One figure as a base64 PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI)
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for line in lines:
        style = {k: v for k, v in line.items() if k not in ("run", "x", "y", "named")}
        label = runs[line["run"]].label if line.get("named") and len(runs) > 1 else None
        ax.plot(line["x"], line["y"], color=colours[line["run"]], label=label, **style)
    values = [v for line in lines for v in line["y"] if v is not None]
    if log == "wide":  # a log scale once the values span 100x (Prodigy's lr 1.0 beside d x lr ~1e-4)
        positive = [v for v in values if v > 0]
        if positive and max(positive) >= 100 * min(positive):
            ax.set_yscale("log", nonpositive="mask")
    elif log and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(runs) > 1 and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.11, right=0.98, top=0.9, bottom=0.16)  # fixed: tight_layout costs a draw
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figures(runs: list[RunView]) -> list[dict]:
    """-> [{id, title, png (base64) or None, note}]: a figure with nothing to draw keeps
    its place with a note instead of an empty plot."""
    out = []
    for fid, title, ylabel, build, log in FIGURES:
        lines, note = build(runs)
        png = render(title, ylabel, lines, runs, log) if lines else None
        out.append({"id": fid, "title": title, "png": png, "note": note or ("" if lines else "nothing recorded")})
    return out
