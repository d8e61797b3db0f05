"""How LoRA files name SDXL's modules, and how those names are read back.

A LoRA module is named by its component (``unet``, ``text_encoder``, ``text_encoder_2``,
as the SDXL pipeline calls them) and its diffusers path in that component. Text-encoder
paths always carry ``text_model.``: that is how every file format spells them, whichever
transformers version (some flatten CLIPTextModel and drop that level) built the model.

Kohya keys are module paths with every "." turned into "_" (SGM paths for the UNet,
see ``sgm.py``). SDXL's module names contain "_" themselves (``transformer_blocks``,
``to_q``, ``in_layers``), so no rule can put the dots back. They are looked up instead,
in a table of every module name the models really have (built once on the meta device,
without weights): a name that is not there belongs to another architecture or network
type and is refused, never guessed at, since a wrong guess loads a LoRA into the wrong
layer or silently drops it.
"""

from __future__ import annotations

import functools
import json

import torch

from ..errors import UserError
from .meta import load_config, meta_unet
from .sgm import config_key, sgm_block_table, to_sgm, unet_name_to_sgm

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
UNET, TEXT_ENCODER, TEXT_ENCODER_2 = COMPONENTS
TEXT_MODEL = "text_model."
# The text-encoder tables come from the shipped SDXL configs: the tiny model's encoders
# are SDXL's with fewer layers, so SDXL's names cover theirs.
TEXT_ENCODER_CONFIGS = {TEXT_ENCODER: "sdxl_text_encoder", TEXT_ENCODER_2: "sdxl_text_encoder_2"}

# lora_te_ is the single text encoder of SD 1.x/2.x files; SDXL's first encoder is the
# same CLIP-L, so such a key can only mean that one.
KOHYA_PREFIXES = {"lora_unet_": UNET, "lora_te1_": TEXT_ENCODER, "lora_te2_": TEXT_ENCODER_2,
                  "lora_te_": TEXT_ENCODER}
KOHYA_PREFIX_OF = {UNET: "lora_unet_", TEXT_ENCODER: "lora_te1_", TEXT_ENCODER_2: "lora_te2_"}

# How sd-scripts' header says which model a LoRA is for; ComfyUI and A1111 read it.
KOHYA_ARCHITECTURE = {
    "ss_base_model_version": "sdxl_base_v1-0",
    "ss_v2": "False",
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
}

# Older diffusers files name attention LoRAs by processor (``...attn1.processor.to_q_lora``):
# the module each processor name stands for, in the UNet and in the CLIP text encoders.
_PROCESSOR_MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROCESSOR_MODULES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def processor_module(component: str, processor: str) -> str | None:
    table = _PROCESSOR_MODULES if component == UNET else _TEXT_PROCESSOR_MODULES
    return table.get(processor)


def canonical_name(component: str, name: str) -> str:
    """A module name as files spell it: text-encoder modules under ``text_model.`` with it,
    whether or not the name came with it (the projection of the second encoder sits
    outside, and stays so)."""
    if component == UNET or name.startswith(TEXT_MODEL) or flat_names(component).get(_flat(name)) == (name, name):
        return name
    return TEXT_MODEL + name


def peft_target(component: str, name: str) -> str:
    """A module name as a peft target: without ``text_model.``, it matches both the nested
    and the flattened CLIP layout (peft matches on name endings)."""
    return name if component == UNET else name.removeprefix(TEXT_MODEL)


def name_from_model(model: torch.nn.Module, component: str, path: str) -> str:
    """The canonical name of the module at ``path`` in ``model``."""
    if component != UNET and not hasattr(model, "text_model"):
        return TEXT_MODEL + path
    return path


def name_in_model(model: torch.nn.Module, component: str, name: str) -> str:
    """The path in ``model`` of the module with canonical name ``name``."""
    if component != UNET and not hasattr(model, "text_model"):
        return name.removeprefix(TEXT_MODEL)
    return name


# --------------------------------------------------------------------------------------
# flattened names


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _add(table: dict, dotted: str, name: str) -> None:
    flat = _flat(dotted)
    if table.get(flat, (dotted, name)) != (dotted, name):
        table[flat] = None  # two modules flatten alike: such a key is refused, not resolved by luck
    else:
        table[flat] = (dotted, name)


@functools.lru_cache(maxsize=8)
def _unet_names(key: str) -> dict[str, tuple[str, str] | None]:
    config = json.loads(key)
    unet = meta_unet(config)
    blocks = sgm_block_table(config)
    table: dict = {}
    for path, _ in unet.named_modules():
        if not path:
            continue
        _add(table, path, path)
        sgm = to_sgm(path, blocks)
        if sgm is not None:
            _add(table, sgm, path)
    return table


@functools.lru_cache(maxsize=None)
def _text_names(component: str) -> dict[str, tuple[str, str] | None]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = load_config(TEXT_ENCODER_CONFIGS[component])
    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in config["architectures"] else CLIPTextModel
    with torch.device("meta"):
        model = cls(CLIPTextConfig(**config))
    table: dict = {}
    for path, _ in model.named_modules():
        if path:
            name = name_from_model(model, component, path)
            _add(table, name, name)
    return table


def flat_names(component: str, unet_config=None) -> dict[str, tuple[str, str] | None]:
    """Flattened name -> (dotted name, diffusers name) for every module of ``component``:
    for the UNet in diffusers and in SGM spelling, from ``unet_config`` (default SDXL's).
    None marks a flattened name two modules share."""
    if component == UNET:
        return _unet_names(config_key(unet_config))
    if component not in TEXT_ENCODER_CONFIGS:
        raise UserError(f"unknown SDXL component {component!r}: use one of {', '.join(COMPONENTS)}")
    return _text_names(component)


def _lookup(flat: str, component: str, unet_config, key: str) -> tuple[str, str]:
    table = flat_names(component, unet_config)
    if flat not in table and component != UNET:
        flat = _flat(TEXT_MODEL) + flat  # a file that drops the text_model level
    if flat not in table:
        raise UserError(f"{key} is not a module of the SDXL {component}: the LoRA was made for another "
                        "model architecture (or is another network type)")
    if table[flat] is None:
        raise UserError(f"{key} could be more than one module of the SDXL {component}: "
                        "the file cannot be read unambiguously")
    return table[flat]


def unflatten(flat: str, component: str, unet_config=None) -> str:
    """A flattened module name -> the dotted name it stands for (its own spelling)."""
    return _lookup(flat, component, unet_config, flat)[0]


def module_from_kohya(base: str, unet_config=None) -> str:
    """A kohya key's module part (``lora_unet_input_blocks_4_1_proj_in``) -> the canonical
    name with its component (``unet.down_blocks.1.attentions.0.proj_in``)."""
    prefix = next((p for p in KOHYA_PREFIXES if base.startswith(p)), None)
    if prefix is None:
        raise UserError(f"{base} has none of kohya's SDXL prefixes ({', '.join(KOHYA_PREFIX_OF.values())})")
    component = KOHYA_PREFIXES[prefix]
    return f"{component}.{_lookup(base[len(prefix):], component, unet_config, base)[1]}"


def kohya_name(full_name: str, unet_config=None) -> str:
    """A canonical name with its component -> the kohya key's module part, SGM names for
    the UNet as sd-scripts writes them for SDXL."""
    component, _, name = full_name.partition(".")
    if component == UNET:
        path = unet_name_to_sgm(name, sgm_block_table(unet_config))
    else:
        path = canonical_name(component, name)
    return KOHYA_PREFIX_OF[component] + _flat(path)
