"""Everything SDXL-specific: configs, the tiny model, loading, LoRA targets, conditioning."""

from .lora import add_lora, lora_module_names, text_encoder_lora_config, unet_lora_config
from .meta import load_config, meta_lora_unet, meta_unet
from .model import SDXL, load_sdxl, resolve_model
from .tiny import tiny_sdxl_path
from .conditioning import denoising_loss, encode_images, encode_prompts, time_ids
