"""``emotrain report``: report.html of one run, of a sweep, or of several runs overlaid."""

from __future__ import annotations

import json
from pathlib import Path

from ..disk.layout import RunFolder
from ..errors import UserError


def run_report(folders: list[str], out: str | None = None) -> str:
    """report.html of one run, of a sweep (its folder) or of several runs overlaid."""


    from ..watch.report import write_report

    if len(folders) == 1 and RunFolder(folders[0]).sweep_json.is_file():
        sweep = RunFolder(folders[0])
        names = [r["name"] for r in json.loads(sweep.sweep_json.read_text())["runs"]]
        runs = [sweep.root / n for n in names if (sweep.root / n).is_dir()]
        if not runs:
            raise UserError(f"sweep {sweep.root} has no run folder yet: run the sweep first")
        path = write_report(runs, out or sweep.report, title=f"emotrain sweep {sweep.root.name}")
    else:
        for folder in folders:
            if not Path(folder).expanduser().is_dir():
                raise UserError(f"run folder {folder} does not exist: pass the --output folder of a run")
        default = RunFolder(folders[0]).report if len(folders) == 1 else Path("report.html")
        path = write_report(folders, out or default)
    return f"wrote {path}"
