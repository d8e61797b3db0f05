"""SDXL: the one model family emotrain trains, and everything that is particular to it.

The rest of emotrain uses only the names imported here, never this package's modules:
loading (``load_sdxl``, ``load_pipeline``, ``resolve_model``), LoRA targets
(``lora_config_for_run``, ``add_lora``...), conditioning and loss (``encode_*``,
``time_ids``, ``denoising_loss``), the build without weights (``meta_sdxl``...), key names
and metadata for LoRA files. A second family (SD 1.5, say) would be a sibling package
with these same names, chosen by the model being loaded.
"""

from .configs import load_config
from .conditioning import denoising_loss, encode_images, noised_loss, time_ids
from .prompts import count_tokens, encode_prompts, token_ids
from .lora import (LAYER_KINDS, TRANSFORMER_KINDS, add_lora, is_conv3x3_target, layer_kind, lora_config_for_run,
                   lora_module_names, text_encoder_lora_config, unet_lora_config)
from .meta import meta_lora_unet, meta_sdxl, meta_unet, random_lora_unet, unet_config
from .model import SDXL, load_pipeline, load_sdxl, resolve_model
from .tiny import tiny_sdxl_path
from .sgm import sgm_block_table, unet_name_from_sgm, unet_name_to_sgm
from .keys import (
    COMPONENTS, KOHYA_ARCHITECTURE, KOHYA_PREFIXES, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_MODEL, UNET, canonical_name,
    flat_names, kohya_name, module_from_kohya, name_from_model, peft_target, processor_module, unflatten,
)
from .parts import base_weight, component_models
