"""Learning rates per part and LoRA+ (run/groups.py): optimizer parameter groups."""

import pytest
import torch
from safetensors import safe_open

from emotrain.config import TrainConfig
from emotrain.disk.verify import choose_checkpoint
from emotrain.run.groups import param_groups
from helpers import run_cli, train


def _named():
    names = ["unet.a.lora_A.default.weight", "unet.a.lora_B.default.weight",
             "text_encoder.b.lora_A.default.weight", "text_encoder.b.lora_B.default.weight",
             "text_encoder_2.c.lora_A.default.weight", "text_encoder_2.c.lora_B.default.weight"]
    return {n: torch.nn.Parameter(torch.zeros(1)) for n in names}


def test_groups_per_part_and_loraplus():
    named = _named()
    assert param_groups(TrainConfig(lr=1e-3, train_text_encoders=True), named) == list(named.values())
    groups = param_groups(TrainConfig(lr=1e-3, train_text_encoders=True, text_encoder_lr=["1e-4"],
                                      loraplus_ratio=16.0), named)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [
        ("unet", 1e-3, 1), ("unet_up", 1.6e-2, 1), ("text_encoder", 1e-4, 1), ("text_encoder_up", 1.6e-3, 1),
        ("text_encoder_2", 1e-4, 1), ("text_encoder_2_up", 1.6e-3, 1)]
    assert groups[1]["params"][0] is named["unet.a.lora_B.default.weight"]


def test_three_groups_in_the_checkpoint_and_the_metadata(tmp_path):
    out = tmp_path / "run"
    result = train(out, "--unet-lr", "1e-3", "--text-encoder-lr", "1e-4", "2e-4", "--train-text-encoders",
                   "--steps", "1", "--optim", "emosens")
    assert "lr 1.0e-03/1.0e-04/2.0e-04" in result.output
    state = torch.load(choose_checkpoint(out)[0] / "training_state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-3), ("text_encoder", 1e-4),
                                                      ("text_encoder_2", 2e-4)]
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_unet_lr"], meta["ss_text_encoder_lr"]) == ("0.001", "[0.0001, 0.0002]")


@pytest.mark.parametrize("args", [["--text-encoder-lr", "1e-4"],
                                  ["--train-text-encoders", "--text-encoder-lr", "1e-4 2e-4 3e-4"],
                                  ["--train-text-encoders", "--text-encoder-lr", "1e-4", "2e-4", "3e-4"]])
def test_bad_text_encoder_lrs(tmp_path, args):
    result = run_cli("sdxl-lora", "--model", "tiny", "--data", "demo", "--output", tmp_path / "x", *args, expect=2)
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_two_text_encoder_lrs_unquoted_read_as_the_repeated_flag():
    from emotrain.cli import spread_number_lists
    repeated = ["sdxl-lora", "--text-encoder-lr", "1e-4", "--text-encoder-lr", "2e-4", "--lr", "3"]
    assert spread_number_lists(["sdxl-lora", "--text-encoder-lr", "1e-4", "2e-4", "--lr", "3"]) == repeated
    assert spread_number_lists(["sdxl-lora", "--text-encoder-lr=1e-4", "2e-4", "--lr", "3"])[2:4] == \
        ["--text-encoder-lr", "2e-4"]
    assert spread_number_lists(repeated) == repeated  # and the quoted and repeated forms stay as they are
    assert spread_number_lists(["sdxl-lora", "--text-encoder-lr", "1e-4 2e-4"]) == ["sdxl-lora", "--text-encoder-lr",
                                                                                     "1e-4 2e-4"]
