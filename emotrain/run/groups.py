"""Optimizer parameter groups: a learning rate per part (UNet, text encoder 1, text
encoder 2: ``--unet-lr``, ``--text-encoder-lr``) and LoRA+ (``--loraplus-ratio``: the up
matrices at lr x ratio, as sd-scripts' loraplus_lr_ratio). Without any of them the
parameters form one group at ``--lr``, as before. Each group is named (``unet``,
``unet_up``, ``text_encoder``...): the name travels in the optimizer's state dict, so a
checkpoint says which lr is which. The scheduler moves every group alike."""

from __future__ import annotations

from ..lora.kinds import LORA

PARTS = ("unet", "text_encoder", "text_encoder_2")


def grouped(cfg) -> bool:
    return cfg.unet_lr is not None or bool(cfg.text_encoder_lr) or bool(cfg.loraplus_ratio)


def param_groups(cfg, named_params: dict) -> list:
    """What the optimizer is built on: a list of parameters (one group), or named groups."""
    if not grouped(cfg):
        return list(named_params.values())
    groups = []
    for part, lr in cfg.part_lrs.items():
        names = [n for n in named_params if n.split(".", 1)[0] == part]
        if not names:
            continue
        if not cfg.loraplus_ratio:
            groups.append({"params": [named_params[n] for n in names], "lr": lr, "name": part})
            continue
        down = [named_params[n] for n in names if not LORA.is_up(n)]
        up = [named_params[n] for n in names if LORA.is_up(n)]
        groups += [{"params": down, "lr": lr, "name": part},
                   {"params": up, "lr": lr * cfg.loraplus_ratio, "name": f"{part}_up"}]
    return [g for g in groups if g["params"]]


def group_lrs(optimizer) -> dict[str, float]:
    """The lr of each group now, by name (``group_N`` for an unnamed one)."""
    return {g.get("name", f"group_{k}"): g["lr"] for k, g in enumerate(optimizer.param_groups)}
