"""The run's adapter at the start of training: base LoRAs (--base-lora) baked into the
frozen weights, then the adapter injected, fresh or continued from a file
(--network-weights, whose kind, targets and ranks win), then with --fp8-base the frozen
UNet layers stored in float8 (sdxl/fp8.py), with gradient checkpointing and regional
compilation (--compile) where asked. The files are read and fitted into the model on the
meta device first (``read_loras``), so a LoRA for another model is refused before any
weights load.
"""

from __future__ import annotations

from ..errors import UserError
from ..sdxl import compile_blocks, repeated_blocks, store_fp8, unet_config
from .formats import load_lora_file
from .inject import add_lora, lora_config_for, lora_config_for_run, meta_sdxl
from .live import load_into_model


def read_loras(cfg) -> tuple:
    """--network-weights and --base-lora read against the model's module names from its
    config alone, and the start LoRA fitted into the model built on the meta device, so a
    LoRA for another model (or of other shapes) is refused before the weights load."""
    from .stacking import load_weighted
    config = unet_config(cfg.model)
    start = load_lora_file(cfg.network_weights, config) if cfg.network_weights else None
    asked = [k for k in ("network_dropout", "rank_dropout", "module_dropout", "scale_weight_norms") if getattr(cfg, k)]
    if start is not None and asked and start.kind != "lora":  # the file's kind wins over --adapter
        raise UserError(f"--{asked[0].replace('_', '-')} applies to plain LoRA only, and {cfg.network_weights} holds "
                        f"{start.kind}: drop it or start from a LoRA file")
    if start is None and cfg.adapter == "lokr" and cfg.lokr_factor > 0:
        meta_sdxl(cfg)  # a factor that does not split a layer is refused here, before the weights load
    if start is not None:
        meta = meta_sdxl(cfg, {c: lora_config_for(start, c) for c in ("unet", "text_encoder", "text_encoder_2")})
        encoders = (meta["text_encoder"], meta["text_encoder_2"]) if cfg.train_text_encoders else None
        load_into_model(meta["unet"], encoders, start)
    return start, load_weighted(cfg.base_lora, config)


def setup_lora(sdxl, cfg, loras: tuple | None = None) -> dict:
    """Bake any base LoRAs into the frozen weights, inject the new LoRA (fresh, or from
    --network-weights) and return the trainable parameters by name."""
    start, bases = loras or read_loras(cfg)
    if bases:
        from .stacking import apply_base_loras
        apply_base_loras(sdxl.unet, sdxl.text_encoders, bases)
    components = {"unet": sdxl.unet}
    if cfg.train_text_encoders:
        components.update(text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2)
    named = {}
    for prefix, module in components.items():
        config = lora_config_for(start, prefix) if start is not None else None
        add_lora(module, config or lora_config_for_run(cfg, prefix))
        named.update({f"{prefix}.{n}": p for n, p in module.named_parameters() if p.requires_grad})
    if start is not None:
        load_into_model(sdxl.unet, sdxl.text_encoders if cfg.train_text_encoders else None, start)
    if getattr(cfg, "fp8_base", False):  # after the injection: the adapter is made from the bf16 weights
        store_fp8(sdxl.unet)
    if cfg.gradient_checkpointing:
        sdxl.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoders:
            for te in sdxl.text_encoders:
                te.gradient_checkpointing_enable()
    if cfg.compile:  # regional: the repeated blocks, with peft's forward inside them (fast.uninstall)
        from .fast import uninstall
        uninstall(sdxl.unet, repeated_blocks(sdxl.unet))
        compile_blocks(sdxl.unet)
    return named
