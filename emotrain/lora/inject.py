"""Putting an adapter into a model: the peft config a run asks for (its targets, ranks
and alphas), the config that reproduces a LoRA file exactly (``lora_config_for``), the
injection itself (``add_lora``), and the SDXL builds that carry one without real weights:
on the meta device (planning, checking a file against the model) or with random weights
(measuring memory).

Adapter parameters are kept in float32 whatever the base dtype, so optimizer state and
updates stay exact.
"""

from __future__ import annotations

import torch

from .. import sdxl
from ..sdxl import TEXT_ENCODER_TARGETS, unet_targets
from .kinds import ADAPTER, KINDS, LORA, is_adapter_tensor, kind_of_config, kind_of_layer
from .weights import LoraWeights


def unet_lora_config(rank: int, alpha: float, conv_rank: int | None = None, conv_alpha: float | None = None,
                     targets: str = "full", adapter: str = "lora", **options):
    """``options``: the kind's own (LoKr: ``factor``, ``full_matrix``)."""
    return KINDS[adapter].peft_config(rank, alpha, unet_targets(targets, conv_rank), conv_rank, conv_alpha, **options)


def text_encoder_lora_config(rank: int, alpha: float, adapter: str = "lora", **options):
    return KINDS[adapter].peft_config(rank, alpha, TEXT_ENCODER_TARGETS, **options)


def kind_options(cfg) -> dict:
    """The adapter kind's own settings in a training config."""
    return {"factor": cfg.lokr_factor, "full_matrix": cfg.lokr_full_matrix} if cfg.adapter == "lokr" else {}


def lora_config_for_run(cfg, component: str = sdxl.UNET):
    """The adapter a training config asks for on ``component``."""
    if component == sdxl.UNET:
        return unet_lora_config(cfg.rank, cfg.effective_alpha, cfg.effective_conv_rank, cfg.effective_conv_alpha,
                                cfg.targets, cfg.adapter, **kind_options(cfg))
    return text_encoder_lora_config(cfg.rank, cfg.effective_alpha, cfg.adapter, **kind_options(cfg))


def peft_config_kwargs(modules: dict, component: str) -> dict:
    """LoraConfig arguments reproducing a file's ``modules`` of ``component`` exactly
    (LoRA and DoRA: what diffusers' load_lora_weights reads)."""
    kwargs = LORA.exact_config_kwargs(modules, {n: sdxl.peft_target(component, n) for n in modules})
    return {**kwargs, "use_dora": True} if any(m.kind == "dora" for m in modules.values()) else kwargs


def lora_config_for(weights: LoraWeights, component: str = sdxl.UNET):
    """A peft config that injects exactly the file's modules with its ranks and alphas
    (for continuing training from a file); None when the file has nothing for ``component``."""
    modules = weights.component(component)
    if not modules:
        return None
    kind = KINDS[LoraWeights(modules).kind]
    return kind.exact_config(modules, {n: sdxl.peft_target(component, n) for n in modules}, weights.metadata)


def add_lora(module: torch.nn.Module, config, adapter: str = ADAPTER, fast: bool = True) -> list:
    """Inject an adapter with peft; freeze the base; return the new trainable parameters.
    ``fast``: the kind's own forward under mixed precision (fast.py) where it has one;
    False keeps peft's."""
    from peft import inject_adapter_in_model

    module.requires_grad_(False)
    # peft directly rather than the models' add_adapter: transformers 5 refuses peft < 0.22.
    inject_adapter_in_model(config, module, adapter_name=adapter)
    kind = kind_of_config(config)
    kind.after_inject(module, adapter)
    if getattr(config, "decompose_factor", -1) > 0:  # LoKr: a factor that cannot split a layer as LyCORIS does
        kind.check_factor(module, config.decompose_factor, adapter)
    params = []
    for name, p in module.named_parameters():
        if is_adapter_tensor(name):
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    if fast and adapter == ADAPTER:
        LORA.install_forward(module)
    return params


def lora_module_names(module: torch.nn.Module) -> list[str]:
    """Names of the modules that carry an adapter (their base-layer names)."""
    return sorted(name for name, layer in module.named_modules() if kind_of_layer(layer, adapter=None) is not None)


def meta_lora_unet(model: str = "sdxl", rank: int = 8, alpha: float = 8, conv_rank: int | None = None,
                   conv_alpha: float | None = None, targets: str = "full"):
    """The UNet with a training LoRA applied, on the meta device."""
    unet = sdxl.meta_unet(sdxl.unet_config(model))
    with torch.device("meta"):
        add_lora(unet, unet_lora_config(rank, alpha, conv_rank, conv_alpha, targets))
    return unet


def meta_sdxl(cfg, lora_configs: dict | None = None) -> dict:
    """UNet, both text encoders and VAE on the meta device with the adapter ``cfg`` trains.
    ``lora_configs``: component -> peft config where it is given (the LoRA file of
    --network-weights, whose ranks and targets win)."""
    modules = sdxl.meta_parts(cfg.model or "sdxl")
    with torch.device("meta"):
        for name, module in modules.items():
            if name == "vae" or (name != sdxl.UNET and not cfg.train_text_encoders):
                continue
            # As training does: the file's adapter where it has one, else a fresh one.
            add_lora(module, (lora_configs or {}).get(name) or lora_config_for_run(cfg, name))
    return modules


def random_lora_unet(model: str, lora_config, device, dtype):
    """A real UNet with random weights (see ``sdxl.random_unet``) and the adapter applied,
    for measuring memory."""
    unet = sdxl.random_unet(model, device, dtype)
    add_lora(unet, lora_config)
    unet.to(device)
    return unet
