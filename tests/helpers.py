"""Shared test helpers: run the CLI in-process and read what a run wrote."""

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from emotrain.cli import app

FAST = ["--model", "tiny", "--data", "demo", "--resolution", "64", "--batch-size", "2", "--rank", "4",
        "--lr", "1e-3", "--seed", "0", "--log-with", "none"]  # TensorBoard only where a test reads it


def run_cli(*args: str, expect: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if expect is not None:
        assert result.exit_code == expect, (result.exit_code, result.output, result.exception)
    return result


def train(output: Path, *args: str, expect: int = 0):
    return run_cli("sdxl-lora", *FAST, "--output", str(output), *args, expect=expect)


def run_json(output: Path) -> dict:
    return json.loads((Path(output) / "run.json").read_text())


def unet_inputs(unet, seed: int = 1) -> dict:
    """A fixed random UNet input of the model's own widths (latents 8x8, 77 tokens)."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(sample=torch.randn(2, cfg.in_channels, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, pooled, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)})


def unet_output(unet, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return unet(**unet_inputs(unet, seed)).sample
