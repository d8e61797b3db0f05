"""Faults in the middle of a run, through the real command: a signal while the trackers
start or the step-0 samples are drawn, and an input file (the encoded-data cache, an
image) that disappears while training. Each ends in one line, with a checkpoint where
one can be had, and nothing damaged."""

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_cli, run_json, train


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.output, result.output
    return [line for line in result.output.splitlines() if line.startswith("error")]


@pytest.mark.parametrize("where", ["trackers", "samples"])
def test_a_signal_before_the_first_step_stops_in_one_line(tmp_path, monkeypatch, where):
    # SIGTERM lands while TensorBoard's writer is being made (accelerate lists the tracker
    # before it starts), or while the step-0 samples are drawn.
    if where == "trackers":
        from torch.utils import tensorboard
        target, name = tensorboard.SummaryWriter, "__init__"
    else:
        from emotrain.watch import samples
        target, name = samples, "generate"
    real = getattr(target, name)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, signalled)
    out = tmp_path / "run"
    extra = ["--log-with", "tensorboard"] if where == "trackers" else ["--sample-prompt", "a cat --s 2"]
    result = train(out, "--steps", "2", *extra, expect=130)
    assert error_lines(result) == ["error: stopped at once by SIGTERM: nothing of this moment was saved; "
                                   "there is no checkpoint yet"]
    assert run_json(out)["status"] == "interrupted" and not (out / "checkpoints").exists()


def test_the_cache_deleted_during_a_run_stops_with_a_checkpoint(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "run"
    result = train(out, "--cache-dir", cache, "--steps", "6", "--optim", "optimizers_for_tests.RemovingSGD",
                   "--optim-args", f"at=2 path='{cache}'", expect=2)
    line, = error_lines(result)
    assert line.startswith("error: stopped at step 2: cache file ") and " is gone (deleted or changed" in line
    assert line.count(str(cache)) == 1 and f"checkpoint {out / 'checkpoints' / 'step-000002'};" in line
    assert line.endswith(f"--resume {out} (it encodes what is missing again)")
    assert run_json(out)["status"] == "stopped-input" and len(run_json(out)["losses"]) == 2
    resumed = run_cli("sdxl-lora", "--resume", out)
    assert "16 encoded" in resumed.output and run_json(out)["status"] == "finished" and run_json(out)["steps"] == 6
