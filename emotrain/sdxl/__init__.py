"""Everything SDXL-specific: configs, the tiny model, loading, LoRA targets, conditioning."""

from .lora import add_lora, lora_module_names, text_encoder_lora_config, unet_lora_config
from .meta import load_config, meta_lora_unet, meta_unet
from .model import SDXL, load_sdxl, resolve_model
from .tiny import tiny_sdxl_path
from .conditioning import denoising_loss, encode_images, encode_prompts, time_ids
from .sgm import sgm_block_table, unet_name_from_sgm, unet_name_to_sgm
from .keys import (
    COMPONENTS, KOHYA_ARCHITECTURE, KOHYA_PREFIXES, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_MODEL, UNET, canonical_name,
    flat_names, kohya_name, module_from_kohya, name_from_model, peft_target, processor_module, unflatten,
)
from .parts import base_weight, component_models
from .model import load_pipeline
