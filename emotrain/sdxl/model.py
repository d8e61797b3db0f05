"""Loading an SDXL model from wherever the user keeps it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..sources import check_model, is_hub_id, tiny_seed


@dataclass
class SDXL:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: object
    tokenizer_2: object
    noise_scheduler: object  # a DDPMScheduler with the model's training schedule
    source: str  # the local folder or file the weights came from

    @property
    def text_encoders(self):
        return (self.text_encoder, self.text_encoder_2)


def resolve_model(model: str) -> str:
    """``tiny[:SEED]``, a diffusers folder, a single checkpoint file, or a hub repo id
    (through huggingface_hub's cache) -> a local path."""
    seed = tiny_seed(model)
    if seed is not None:
        from .tiny import tiny_sdxl_path
        return str(tiny_sdxl_path(seed))
    check_model(model)
    if is_hub_id(model):
        from huggingface_hub import snapshot_download
        try:
            return snapshot_download(model, allow_patterns=["*.json", "*.txt", "*.safetensors"],
                                     ignore_patterns=["*.fp16.safetensors", "*refiner*", "*.onnx*"])
        except Exception as exc:  # network, auth or a missing repo: one line, not a traceback
            raise UserError(f"could not fetch model {model!r} from the hub ({type(exc).__name__}): "
                            "check the repo id and your connection, or pass a local folder") from None
    return str(Path(model).expanduser())


def load_pipeline(model: str, weight_dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32):
    """The diffusers SDXL pipeline for anything --model accepts -> (pipeline, local source)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Their per-component bars would interleave with ours; our own bar covers the load.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    source = resolve_model(model)
    try:
        if Path(source).is_file():
            pipe = StableDiffusionXLPipeline.from_single_file(source, dtype=weight_dtype)
        else:
            dtypes = {"default": weight_dtype, "vae": vae_dtype}
            pipe = StableDiffusionXLPipeline.from_pretrained(source, dtype=dtypes, use_safetensors=True)
    except Exception as exc:
        raise UserError(f"could not load SDXL model from {source}: {exc}".splitlines()[0]) from None
    if pipe.vae.dtype != vae_dtype:
        pipe.vae.to(vae_dtype)
    return pipe, source


def load_sdxl(model: str, weight_dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32) -> SDXL:
    """The parts training needs, frozen, with a DDPM scheduler of the model's schedule."""
    from diffusers import DDPMScheduler

    pipe, source = load_pipeline(model, weight_dtype, vae_dtype)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
        m.eval()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return SDXL(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                noise_scheduler, source)
