"""What a user reads: --help at 80 columns, a bar that fits 80 columns, plain progress
lines without a terminal (nohup, CI, > log), and no third-party noise."""

import io
import os
import re
import subprocess
import sys
import time

from rich.console import Console

from emotrain.options import OPTIONS
from emotrain.watch.progress import TrainProgress
from helpers import FAST

NOISE = re.compile(r"warn|deprecat|failed to load|gemm_4bit|traceback", re.IGNORECASE)
REPORT_BNB = ("import atexit, runpy, sys\n"
              "atexit.register(lambda: print('bitsandbytes:', type(sys.modules.get('bitsandbytes')).__name__, "
              "file=sys.stderr))\nsys.argv = ['emotrain', *sys.argv[1:]]\nrunpy.run_module('emotrain', run_name='__main__')")


def emotrain(*args, report_bnb=False, env=None, **kwargs):
    cmd = [sys.executable, "-c", REPORT_BNB] if report_bnb else [sys.executable, "-m", "emotrain"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **kwargs)


def test_help_at_80_columns_cuts_no_flag_and_shows_defaults():
    out = emotrain("sdxl-lora", "--help", env={"COLUMNS": "80"})
    assert out.returncode == 0 and out.stderr == ""
    text = out.stdout
    tokens = set(re.findall(r"--[a-z0-9-]+", text))
    for o in OPTIONS:
        for flag in o.flags.split("/"):
            assert flag in tokens, f"{flag} is missing or cut"
    flat = " ".join(text.split())
    for flag, default in [("--steps", "1000"), ("--rank", "16"), ("--resolution", "1024"), ("--optim", "emoairy")]:
        assert re.search(re.escape(flag) + r" \S+ [^[]*\[default: " + re.escape(default) + r"\]", flat), flag
    for line in text.splitlines():  # only a flag with its list of choices may run past 80 columns
        assert len(line) <= 80 or line.lstrip().startswith("--"), line


def test_the_bar_fits_80_columns():
    buf = io.StringIO()
    progress = TrainProgress(20000, Console(file=buf, width=80, force_terminal=True, color_system=None))
    with progress:
        progress.update(100, 0.1234, 0.5, 3e-4)
        time.sleep(0.05)
        progress.update(12345, 0.1234, -0.25, 3e-4)
        progress.console.print(progress._progress.make_tasks_table(progress._progress.tasks))
    lines = [line for line in buf.getvalue().splitlines() if "12345/20000" in line]
    assert lines, buf.getvalue()
    line = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", lines[-1]).rstrip()
    assert len(line) <= 80 and "…" not in line, line
    assert re.search(r"12345/20000 loss 0\.\d{4} s [+-]0\.\d{3} lr 3\.0e-04 [\d.]+ it/s \d+:\d\d<[\d:]+$", line), line


def test_without_a_terminal_a_log_gets_plain_progress_lines(tmp_path):
    # A fresh cache: the first run, which builds the tiny model and the demo images, is quiet too.
    out = emotrain("sdxl-lora", *FAST, "--steps", "3", "--output", tmp_path / "run", report_bnb=True,
                   env={"EMOTRAIN_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    err = out.stderr
    assert "\x1b[" not in err and "━" not in err  # no bar, no escape codes in a log
    assert "loading model ..." in err and re.search(r"^encoding images.* \(16\) \.\.\.$", err, re.MULTILINE)
    steps = re.findall(r"^step (\d)/3  loss \d\.\d{4} s [+-]\d\.\d{3} lr \S+  (?:[\d.]+|-) it/s  elapsed \d+:\d\d  "
                       r"ETA \S+$", err, re.MULTILINE)
    assert steps[0] == "1" and steps[-1] == "3", err  # the first and the last step at least
    assert "bitsandbytes: NoneType" in err  # never imported for the Emo family
    assert not NOISE.search(err + out.stdout), err


def test_vram_measure_shows_progress_and_8bit_loads_bitsandbytes_quietly():
    out = emotrain("vram", "--model", "tiny", "--rank", "4", "--resolution", "64", "--measure", "--measure-steps", "2",
                   "--optim", "emoairy", report_bnb=True)
    assert out.returncode == 0, out.stderr
    assert "building the UNet ..." in out.stderr and "measuring (2) ..." in out.stderr
    assert "bitsandbytes: NoneType" in out.stderr and "EmoAiry" in out.stdout
    assert not NOISE.search(out.stderr + out.stdout), out.stderr
    # the same shapes: the plan's trace comes from the cache the first command filled
    out = emotrain("vram", "--model", "tiny", "--rank", "4", "--resolution", "64", "--optim", "adamw8bit",
                   report_bnb=True)
    assert out.returncode == 0 and "bitsandbytes: module" in out.stderr, out.stderr
    assert not NOISE.search(out.stderr + out.stdout), out.stderr


def test_other_commands_are_quiet():
    # vram on the tiny model (its trace is quiet in the test above; an SDXL trace is a CPU-half-minute)
    vram = ["vram", "--model", "tiny", "--rank", "4", "--resolution", "64"]
    for args in (["--help"], ["presets"], vram, ["merge", "--help"], ["convert", "--help"]):
        out = emotrain(*args)
        assert out.returncode == 0 and not NOISE.search(out.stderr + out.stdout), (args, out.stderr)
