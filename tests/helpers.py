"""Shared test helpers: run the CLI in-process and read what a run wrote."""

import json
from pathlib import Path

from typer.testing import CliRunner

from emotrain.cli import app

FAST = ["--model", "tiny", "--data", "demo", "--resolution", "64", "--batch-size", "2", "--rank", "4",
        "--lr", "1e-3", "--seed", "0"]


def run_cli(*args: str, expect: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if expect is not None:
        assert result.exit_code == expect, (result.exit_code, result.output, result.exception)
    return result


def train(output: Path, *args: str, expect: int = 0):
    return run_cli("sdxl-lora", *FAST, "--output", str(output), *args, expect=expect)


def run_json(output: Path) -> dict:
    return json.loads((Path(output) / "run.json").read_text())
