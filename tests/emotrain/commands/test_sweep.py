"""`emotrain sweep` and `emotrain report` through the real CLI: three optimizers on the
demo data, killed mid-sweep and resumed; the overlaid report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser

import pytest

from helpers import FAST, run_cli, run_json

NO_LR = [a for i, a in enumerate(FAST) if "--lr" not in (a, FAST[i - 1])]  # each optimizer's own default
ARGS = [*NO_LR, "--steps", "6", "--save-every", "2", "--val-split", "0.125", "--log-with", "none",
        "--sample-prompt", "a red circle --w 64 --h 64 --s 2"]
OPTIMS = ["emosens", "emoairy", "prodigy", "adamw-schedulefree"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    cmd = ["sweep", "--optim", ",".join(OPTIMS), *ARGS, "--output", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "emotrain", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    deadline = time.time() + 600
    while not (out / "emoairy" / "checkpoints" / "step-000002").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: emosens done, emoairy interrupted, the others not started
    proc.communicate(timeout=60)
    kept = (out / "emosens" / "run.json").stat().st_mtime_ns
    assert not (out / "prodigy").exists() and not (out / "emoairy" / "lora.safetensors").exists()
    result = run_cli(*cmd)
    return out, kept, result.output


def test_a_killed_sweep_resumes(sweep):
    out, kept, output = sweep
    assert "[1/4] emosens: finished earlier, kept" in output
    assert "[2/4] emoairy: resuming" in output and "[3/4] prodigy: training" in output
    assert "[4/4] adamw-schedulefree: training" in output
    assert (out / "emosens" / "run.json").stat().st_mtime_ns == kept  # the finished run untouched
    assert "checkpoints/step-0000" in run_json(out / "emoairy")["resumed_from"]
    for name in OPTIMS:
        run = run_json(out / name)
        assert run["status"] == "finished" and run["steps"] == 6 and run["config"]["optim"] == name
        assert run["config"]["lr"] == (1.0 if name == "prodigy" else 3e-4)  # Prodigy at its own lr
        assert (out / name / "lora.safetensors").is_file()
    assert "emoairy" in output and "final val loss" in output  # the summary table


def test_same_validation_for_every_optimizer(sweep):
    out, _, _ = sweep
    first = {}
    for name in OPTIMS:
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
        first[name] = val[0]
        assert sorted(val) == [0, 2, 4, 6]
    assert len(set(first.values())) == 1  # step 0: the same base, noise and timesteps for all
    assert len({json.dumps(run_json(out / n)["validation"], sort_keys=True) for n in OPTIMS}) == 1


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures, self.rows, self.samples, self._fig = {}, 0, 0, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self._fig = attrs["id"]
            self.figures[self._fig] = 0
        elif tag == "img" and self._fig:
            self.figures[self._fig] += 1
        elif tag == "img" and attrs.get("class") == "sample":
            self.samples += 1
        elif tag == "tr":
            self.rows += 1

    def handle_endtag(self, tag):
        if tag == "figure":
            self._fig = None


def test_sweep_report_overlays_the_runs(sweep):
    out, _, _ = sweep
    page = Page()
    page.feed((out / "report.html").read_text())
    assert {"fig-loss", "fig-val", "fig-lr", "fig-emotion", "fig-memory"} <= set(page.figures)
    assert set(page.figures.values()) == {1}
    assert page.samples == 4 * 4  # 4 runs x (step 0 + 3 sample steps), side by side
    text = (out / "report.html").read_text()
    assert "no emotion scalar in prodigy, adamw-schedulefree" in text
    assert "lr x (1 - |s|) for the Emo family; d x lr for Prodigy; the warm-up lr for schedule-free" in text
    for name in OPTIMS:
        assert f"{name}: " in text  # a row and a legend entry per run


def test_report_says_why_validation_is_not_overlaid(sweep, tmp_path):
    out, _, _ = sweep
    other = tmp_path / "other"
    shutil.copytree(out / "emocats" if (out / "emocats").exists() else out / "emoairy", other)
    info = run_json(other)
    info["validation"]["seed"] = 123
    (other / "run.json").write_text(json.dumps(info))
    run_cli("report", out / "emosens", other, "--out", tmp_path / "r.html")
    assert "other not overlaid: another seed (noise) than emosens" in (tmp_path / "r.html").read_text()
    assert "wrote" in run_cli("report", out).output  # a sweep folder: its own report again


@pytest.mark.parametrize("args,message", [
    (["--optim", "emosens", "--shadow", "sometimes"], "--shadow must be one of off, on, both"),
    (["--optim", "emosens", "--lr", "1e-4,fast"], "--lr: 'fast' is not a number"),
    (["--optim", "emosens", "--lr", "-1"], "--lr: must be positive"),
    (["--optim", "nosuch"], "unknown optimizer 'nosuch'"),
    (["--rank", "8", "--optim", "emosens"], "has another rank"),
])
def test_sweep_input_errors_are_one_line(sweep, args, message):
    out, _, _ = sweep
    result = run_cli("sweep", *FAST, "--output", out, *args, expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


def test_report_of_a_folder_that_is_no_run(tmp_path):
    result = run_cli("report", tmp_path, expect=2)
    assert "is not an emotrain run folder" in result.output
