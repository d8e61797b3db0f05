"""`emotrain sweep` and `emotrain report` keep what is there and answer mistakes at once:
a second sweep into a folder adds to sweep.json (even when it then fails) instead of
replacing it; learning rates that look alike in 6 digits get folders of their own; a
damaged sweep.json or run.json is one line; argument errors come before matplotlib and
torch are imported (issue 15: 4, 8, 11, 12, 21)."""

import json
import subprocess
import sys

import pytest

from helpers import FAST, run_cli

ONE_STEP = [*FAST, "--steps", "1"]


def names(out):
    return [r["name"] for r in json.loads((out / "sweep.json").read_text())["runs"]]


def one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_a_second_sweep_adds_to_the_first(tmp_path):
    out = tmp_path / "s"
    first = run_cli("sweep", "--optim", "emosens", *ONE_STEP, "--output", out)
    assert "[1/1] emosens: training" in first.output and names(out) == ["emosens"]
    # Another optimizer with other shared settings: refused before anything is written.
    assert "whose run emosens has another rank (4)" in one_line(
        run_cli("sweep", "--optim", "adamw", *ONE_STEP, "--rank", "8", "--output", out, expect=2))
    assert names(out) == ["emosens"]
    # Two rates alike in 6 digits, and the second command fails at its first run (its
    # folder holds a finished run): sweep.json still holds the first sweep's run.
    taken = out / "adamw-lr0.001"
    taken.mkdir()
    (taken / "run.json").write_text(json.dumps({"status": "finished"}))
    (taken / "lora.safetensors").write_bytes(b"mine")
    failed = run_cli("sweep", "--optim", "adamw", *ONE_STEP, "--lr", "1e-3,1.0000001e-3", "--output", out, expect=2)
    assert "adamw-lr0.001 already holds a finished run" in failed.output
    assert names(out) == ["emosens", "adamw-lr0.001", "adamw-lr0.0010000001"]
    assert (taken / "lora.safetensors").read_bytes() == b"mine"
    # A third command adds adamw; the report overlays every run of the folder.
    third = run_cli("sweep", "--optim", "adamw", *ONE_STEP, "--output", out)
    assert "[1/1] adamw: training" in third.output
    assert names(out) == ["emosens", "adamw-lr0.001", "adamw-lr0.0010000001", "adamw"]
    page = (out / "report.html").read_text()
    assert "emosens: " in page and "adamw: " in page
    table = third.output.split("sweep: held-out validation loss")[1]
    assert "emosens" in table and "adamw" in table  # the summary lists the first command's run too
    assert f"report: {out / 'report.html'}" in third.output


@pytest.fixture
def broken(tmp_path):
    """A sweep folder with a damaged sweep.json, and run folders with a damaged run.json."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text('{"runs": [{"name": "emosens", "con')
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "run.json").write_text("[1, 2]")
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "run.json").write_text('{"status": "finished", "config": {"optim": "emos')
    (cut / "metrics.jsonl").write_text('{"step": 0, "train/loss": 1.0}\n')
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "sweep.json").write_text('{"runs": {"emosens": 1}}')
    return tmp_path


# (command line, what the one line says): each answered before matplotlib or torch loads
CASES = [
    (["report", "{sweep}"], "sweep.json is damaged (truncated or not JSON"),
    (["report", "{wrong}"], "sweep.json is damaged (not the list of runs a sweep writes)"),
    (["report", "{listed}"], "run.json is damaged (it holds a list, not the object a run writes)"),
    (["report", "{cut}"], "run.json is damaged (truncated or not JSON"),
    (["report", "{cut}", "--out", "{tmp}/r.html"], "run.json is damaged"),
    (["report", "{tmp}/nosuch"], "does not exist"),
    (["report", "{tmp}"], "is not an emotrain run folder"),
    (["report", "{listed}", "{tmp}/nosuch", "--out", "{tmp}/r.html"], "run.json is damaged"),
    (["sweep", "--optim", "emosens", *ONE_STEP, "--output", "{sweep}"], "sweep.json is damaged"),
    (["sweep", "--optim", "emosens", *ONE_STEP, "--output", "{wrong}"], "sweep.json is damaged"),
    (["sweep", "--optim", "emosens", *ONE_STEP, "--lr", ",", "--output", "{tmp}/new"], "--lr: ',' names no lr"),
    (["sweep", "--optim", "emosens", *ONE_STEP, "--lr", " , ", "--output", "{tmp}/new"], "names no learning rate"),
    (["sweep", "--optim", "emosens", *ONE_STEP, "--shadow", "x", "--output", "{tmp}/new"], "--shadow must be"),
    (["sweep", "--optim", "emosens", *ONE_STEP, "--output", "{cut}"], "not empty and holds no sweep"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in enumerate(CASES)])
def test_refused_in_one_line_before_heavy_imports(broken, args, message):
    message = message.replace("names no lr", "names no learning rate")
    args = [a.format(**{p.name: p for p in broken.iterdir()}, tmp=broken) for a in args]
    before = {p: p.read_bytes() for p in broken.rglob("*") if p.is_file()}
    code = ("import sys\nfrom emotrain.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    heavy = sorted(m for m in ('torch', 'matplotlib') if m in sys.modules)\n"
            "    print('imported:', heavy, file=sys.stderr)\n    raise\n")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 2 and message in lines[0] and lines[1] == "imported: []", result.stderr
    assert {p: p.read_bytes() for p in broken.rglob("*") if p.is_file()} == before  # nothing written


def test_the_sweep_names_its_runs_apart():
    from emotrain.disk.layout import sweep_run_name
    # the folder names users already have stay; rates alike in 6 digits are told apart
    assert [sweep_run_name("emosens", False, lr) for lr in (1e-4, 3e-4, 1.0, 1e-5, 1.0000001e-4)] == [
        "emosens-lr0.0001", "emosens-lr0.0003", "emosens-lr1", "emosens-lr1e-05", "emosens-lr0.00010000001"]
    assert "would share the run folder PlainSGD" in one_line(run_cli(
        "sweep", "--optim", "optimizers_for_tests.PlainSGD,other.PlainSGD", *ONE_STEP, "--output", "x", expect=2))
