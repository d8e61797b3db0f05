"""The built-in tiny SDXL: SDXL's architecture at toy width, random weights from a seed.

Same block types and layout as SDXL 1.0 (three levels, two ResNets per down block,
cross-attention in the two deeper levels, a text-time additional embedding, two CLIP
text encoders whose hidden sizes add up to the cross-attention width, an 8x VAE and
SDXL's noise schedule), so every code path that runs on SDXL runs here in seconds.
It is written once as an ordinary diffusers folder and then loaded like any model.
``vpred``: the same weights with a scheduler that says v-prediction and zero terminal
SNR, as a NoobAI-XL v-pred folder does (``--model tiny-vpred``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..disk.atomic import atomic_path
from ..disk.cache import cache_root
from .configs import load_config

FORMAT_VERSION = 1
TEXT_WIDTH = 32  # each text encoder's hidden size; the UNet's cross-attention sees 2x
TIME_EMBED = 8

TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 2],
    "attention_head_dim": [2, 4, 4],
    "norm_num_groups": 8,
    "cross_attention_dim": 2 * TEXT_WIDTH,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED,
    "projection_class_embeddings_input_dim": 6 * TIME_EMBED + TEXT_WIDTH,
    "upcast_attention": False,
}

TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": 64,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


def _text_config(projection: bool) -> dict:
    return {
        "hidden_size": TEXT_WIDTH, "intermediate_size": 2 * TEXT_WIDTH, "num_attention_heads": 2,
        "num_hidden_layers": 3, "max_position_embeddings": 77, "projection_dim": TEXT_WIDTH,
        "hidden_act": "gelu" if projection else "quick_gelu", "layer_norm_eps": 1e-5,
    }


def _write_tokenizer(folder: Path, pad_token: str) -> int:
    """A CLIP BPE tokenizer with a byte-level vocabulary and no merges: every character
    is a token. Real CLIP tokenizers are downloads; this one is built from nothing."""
    from transformers import CLIPTokenizer

    # GPT-2/CLIP byte-level alphabet: printable bytes stand for themselves, the other
    # bytes are shifted to code points from 256 upwards, in byte order.
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    shifted = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], pad_token=pad_token,
                        model_max_length=77)
    tok.save_pretrained(folder)
    return len(tokens)


def build_tiny_sdxl(folder: Path, seed: int = 0, vpred: bool = False) -> None:
    """Write the tiny model as a diffusers SDXL folder; same seed, same weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Writing model shards" bars: noise for a 1 MB model

    with tempfile.TemporaryDirectory() as tmp:
        vocab = _write_tokenizer(Path(tmp) / "tokenizer", "<|endoftext|>")
        _write_tokenizer(Path(tmp) / "tokenizer_2", "!")
        tokenizer = CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer_2")
    specials = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id, "vocab_size": vocab}

    def seeded(offset, make):
        with torch.random.fork_rng(devices=[]):  # the caller's random stream stays untouched
            torch.manual_seed(seed * 1000 + offset)
            return make()

    unet = seeded(1, lambda: UNet2DConditionModel.from_config(TINY_UNET))
    vae = seeded(2, lambda: AutoencoderKL.from_config(TINY_VAE))
    te1 = seeded(3, lambda: CLIPTextModel(CLIPTextConfig(**_text_config(False), **specials)))
    te2 = seeded(4, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**_text_config(True), **specials)))
    schedule = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True} if vpred else {}
    scheduler = EulerDiscreteScheduler.from_config(load_config("sdxl_scheduler"), **schedule)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)


def tiny_sdxl_path(seed: int = 0, vpred: bool = False) -> Path:
    """The tiny model's folder, built on first use. Built in a temporary folder and
    renamed into place, so an interrupted build is never mistaken for a model."""
    folder = cache_root() / f"tiny-sdxl-v{FORMAT_VERSION}{'-vpred' if vpred else ''}-seed{seed}"
    if (folder / "model_index.json").is_file():
        return folder
    with atomic_path(folder, directory=True, if_exists="keep") as tmp:  # racing builds are identical
        build_tiny_sdxl(tmp, seed, vpred)
    return folder
