"""SDXL: everything emotrain knows that is particular to the SDXL architecture.

emotrain trains one model family, SDXL (SDXL 1.0 and the community checkpoints of its
architecture); this package is where that knowledge lives, so the rest of emotrain
reaches it only through the names imported here, never this package's modules: loading
(``load_sdxl``, ``load_pipeline``, ``resolve_model``), which layers take an adapter
(``unet_targets``, ``layer_kind``...), float8 storage of the frozen UNet (``store_fp8``), conditioning
(``encode_*``, ``time_ids``) and the UNet's call (``predict``, ``compile_blocks``), the builds without
weights (``meta_parts``, ``random_unet``...),
and the module names of LoRA files (kohya, SGM, diffusers). It is not a plug-in seam for
other families: a second family would first need one here.
"""

from .configs import load_config
from .conditioning import encode_images, predict, time_ids
from .prompts import CHUNK, count_tokens, encode_prompts, token_ids
from .targets import LAYER_KINDS, TEXT_ENCODER_TARGETS, TRANSFORMER_KINDS, Targets, layer_kind, unet_targets, weight_shape
from .meta import meta_parts, meta_unet, random_unet, unet_config
from .model import SDXL, Schedule, load_pipeline, load_sdxl, model_schedule, resolve_model
from .tiny import tiny_sdxl_path
from .sgm import sgm_block_table, unet_name_from_sgm, unet_name_to_sgm
from .keys import (
    COMPONENTS, KOHYA_ARCHITECTURE, KOHYA_PREFIXES, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_MODEL, UNET, canonical_name,
    flat_names, kohya_name, module_from_kohya, name_from_model, peft_target, processor_module, unflatten,
)
from .parts import base_weight, component_models
from .fp8 import STORAGE as FP8_STORAGE, fp8_cast_bytes, fp8_frozen_bytes, fp8_layers, store_fp8, stored_dtype
from .regions import check_compiler, compile_blocks, repeated_blocks
