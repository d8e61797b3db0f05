"""``report.html`` for one run (written at the end of every run, and by ``emotrain
report OUTPUT``), several runs overlaid (``emotrain report A B --out FILE``) or a sweep."""

from __future__ import annotations

from pathlib import Path

from ..disk.atomic import write_text
from .figures import figures
from .page import page
from .runs import load_run


def write_report(folders: list, out, title: str | None = None, intro: str = "") -> Path:
    runs = [load_run(f) for f in folders]
    out = Path(out).expanduser()
    title = title or ("emotrain run " + runs[0].folder.name if len(runs) == 1
                      else "emotrain: " + ", ".join(r.folder.name for r in runs))
    write_text(out, page(title, runs, figures(runs), [r.summary() for r in runs], out, intro))
    return out
