"""The one option declaration: every option reaches --help, presets, the resume rule,
run.json and docs/options.md; values are checked before torch is imported."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from emotrain.config import TrainConfig, check_keys, coerce, resolve_config, resumed_config
from emotrain.errors import UserError
from emotrain.options import BY_NAME, GROUPS, OPTIONS, RESUMABLE, markdown_table
from helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]


def test_config_fields_are_the_declared_options():
    import dataclasses
    assert [f.name for f in dataclasses.fields(TrainConfig)] == [o.name for o in OPTIONS]
    cfg = TrainConfig()
    for o in OPTIONS:
        assert getattr(cfg, o.name) == o.default
    assert TrainConfig().base_lora is not TrainConfig().base_lora  # list defaults are not shared


def test_every_option_is_in_help_in_its_panel():
    text = run_cli("sdxl-lora", "--help").output
    for o in OPTIONS:
        assert o.cli_name in text, o.name
    # panels in the declared order, each option under its own panel
    positions = [text.index(f"\n{group}:\n") for group in GROUPS]
    assert positions == sorted(positions)
    for o in OPTIONS:
        panel = text.rindex("\n\n", 0, text.index(o.cli_name + " "))
        assert text[panel:].lstrip().startswith(o.group + ":"), o.name


def test_every_option_is_a_preset_key(tmp_path):
    # A preset that sets every option (to a valid non-default value where there is one)
    values = {"model": "tiny", "data": "demo", "network_weights": None, "base_lora": [], "alpha": 2.0,
              "conv_rank": 2, "conv_alpha": 1.0, "min_snr_gamma": 5.0, "optim_args": ["betas=(0.9,0.99)"]}
    lines = []
    for o in OPTIONS:
        value = values.get(o.name, o.default)
        if value is None:
            continue
        lines.append(f"{o.name.replace('_', '-') if o.name.endswith('s') else o.name} = {json.dumps(value)}")
    preset = tmp_path / "all.toml"
    preset.write_text("\n".join(lines) + "\n")
    cfg = resolve_config(str(preset))
    for o in OPTIONS:
        if values.get(o.name, o.default) is not None:
            assert getattr(cfg, o.name) == values.get(o.name, o.default), o.name
    with pytest.raises(UserError, match="unknown key 'rnak'"):
        check_keys({"rnak": 1}, "test")


def test_resume_rule_comes_from_the_declaration():
    saved = TrainConfig(model="tiny", data="demo")
    for o in OPTIONS:
        if o.resumable:
            continue
        other = {bool: not o.default, int: 7, float: 0.5, str: "x", list: ["a=1"]}[o.type]
        with pytest.raises(UserError, match="differs from the checkpoint"):
            resumed_config(saved, {o.name: other})
    # what changes neither the result nor its exactness: length, saving, where things go, reporting,
    # watching the run
    assert set(RESUMABLE) == {"steps", "save_every", "keep_checkpoints", "output", "cache_dir", "disk_cache",
                              "strict_data", "record_draws", "progress_every", "val_every", "sample_prompts",
                              "sample_prompt", "sample_every", "sample_sampler", "sample_steps",
                              "sample_keep_models", "log_with", "log_every", "memory_check", "ema_for_eval"}
    cfg = resumed_config(saved, {"steps": 2000, "keep_checkpoints": 9, "rank": saved.rank})
    assert (cfg.steps, cfg.keep_checkpoints) == (2000, 9)


def test_docs_table_is_current():
    assert (ROOT / "docs" / "options.md").read_text() == markdown_table() + "\n", \
        "docs/options.md is stale: python -m emotrain.options > docs/options.md"
    for o in OPTIONS:
        assert f"`{o.name}`" in markdown_table()


@pytest.mark.parametrize("name,value,message", [
    ("lr", math.nan, "lr: must be a finite number"),
    ("lr", math.inf, "lr: must be a finite number"),
    ("alpha", -1.0, "alpha: must be positive"),
    ("max_grad_norm", math.nan, "max_grad_norm: must be a finite number"),
    ("noise_offset", -0.1, "noise_offset: must be at least 0"),
    ("seed", 2**40, "seed: must be at most 4294967295"),
    ("resolution", 100, "resolution: must be a multiple of 32"),
    ("targets", "attention", "targets: must be one of full, transformer"),
    ("mixed_precision", "fp8", "mixed_precision: must be one of no, fp16, bf16"),
    ("optim", "sgdx", "unknown optimizer 'sgdx'"),
])
def test_values_are_checked_against_the_declaration(name, value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        resolve_config(None, {"model": "tiny", "data": "demo", name: value})


def test_types_are_checked():
    assert coerce(BY_NAME["lr"], 1, "x") == 1.0  # an integer is a number
    for name, value in [("rank", 2.5), ("rank", True), ("shadow", 1), ("lr", "fast"), ("base_lora", [1])]:
        with pytest.raises(UserError, match=f"{name} x must be"):
            coerce(BY_NAME[name], value, "x")
    with pytest.raises(UserError, match="conv_rank: --targets transformer has no convolutions"):
        resolve_config(None, {"model": "tiny", "data": "demo", "targets": "transformer", "conv_rank": 4})


def test_config_errors_answer_before_torch_is_imported():
    # The real command in a fresh process: one line, exit 2, and torch never imported.
    code = ("import sys, runpy; sys.argv = ['emotrain', 'sdxl-lora', '--model', 'tiny', '--data', 'demo', "
            "'--lr', 'inf']\ntry:\n    runpy.run_module('emotrain', run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "exit 2 False", (out.stdout, out.stderr)
    assert out.stderr.strip() == "error: lr: must be a finite number, got inf (the Emo family works well at 2e-4 to 4e-4)"


def test_command_line_mistakes_are_one_line(tmp_path):
    for args, message in [(["--rank", "abc"], "Invalid value for '--rank'"), (["--rnak", "3"], "No such option: --rnak")]:
        out = subprocess.run([sys.executable, "-m", "emotrain", "sdxl-lora", *args], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
        assert out.returncode == 2 and out.stdout == ""
        assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []
