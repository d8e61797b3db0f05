"""``emotrain report``: report.html of one run, of a sweep, or of several runs overlaid.
Every argument is checked (folders, run.json, sweep.json, where the page goes) before
the report's modules (matplotlib, torch) are imported: a mistake is answered at once."""

from __future__ import annotations

from pathlib import Path

from ..disk.atomic import check_target, check_writable
from ..disk.layout import RunFolder, shown
from ..errors import UserError
from ..watch.runs import read_sweep, run_info


def run_report(folders: list[str], out: str | None = None) -> str:
    """report.html of one run, of a sweep (its folder) or of several runs overlaid."""
    title = None
    if len(folders) == 1 and RunFolder(folders[0]).sweep_json.is_file():
        sweep = RunFolder(folders[0])
        names = read_sweep(sweep, "pass the sweep's run folders themselves (emotrain report RUN... --out FILE)")
        runs = [sweep.root / n for n in names if (sweep.root / n).is_dir()]
        if not runs:
            raise UserError(f"sweep {sweep.root} has no run folder yet: run the sweep first")
        target, title = Path(out or sweep.report), f"emotrain sweep {sweep.root.name}"
    else:
        runs = folders
        target = Path(out) if out else RunFolder(folders[0]).report if len(folders) == 1 else Path("report.html")
    for folder in runs:
        run_info(folder)
    if not str(target).strip():
        raise UserError("--out is empty: pass a file for the page, e.g. report.html")
    target = target.expanduser()
    check_target(target, directory=False)
    check_writable(target)

    from ..watch.report import write_report

    return f"wrote {shown(write_report(runs, target, title=title))}"
