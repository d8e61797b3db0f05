"""A tiny model's UNet and both text encoders with a random adapter of a kind, through
emotrain's injection (no tensor at its zero start; DoRA's magnitude near peft's start
||W||), copied out as emotrain saves it: files to check against real clients' loaders."""

import copy

import torch

from emotrain.config import TrainConfig
from emotrain.lora.inject import add_lora, lora_config_for_run
from emotrain.lora.live import lora_weights_from_model
from emotrain.sdxl import COMPONENTS


def random_weights(kind: str, model, seed: int = 0):
    """-> LoraWeights of ``kind`` (rank 4; LoKr factor 4) on ``model`` (an emotrain SDXL, left as it is)."""
    cfg = TrainConfig(model="tiny", rank=4, adapter=kind, train_text_encoders=True,
                      **({"lokr_factor": 4} if kind == "lokr" else {}))
    parts = [copy.deepcopy(m) for m in (model.unet, model.text_encoder, model.text_encoder_2)]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for component, part in zip(COMPONENTS, parts):
            add_lora(part, lora_config_for_run(cfg, component), fast=False)
            for name, p in part.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (p if "magnitude" in name else 0))
    return lora_weights_from_model(parts[0], parts[1:])
