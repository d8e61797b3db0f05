"""Max-norm of each LoRA module's delta (``--scale-weight-norms``), as sd-scripts defines it
(networks/lora.py, ``apply_max_norm_regularization``), for the ``lora`` kind.

After each optimizer step, for every LoRA module with down ``A`` (rank x in, or a conv
kernel rank x in x kh x kw), up ``B`` (out x rank) and scale ``s = alpha / rank``, the
delta is ``D = s * B @ A`` (a 3x3 conv's kernel: the same product over the flattened
kernel) and its norm the Frobenius norm ``||D||``. Where ``||D|| > m`` both factors are
multiplied by ``sqrt(m / ||D||)``, so the delta's norm becomes ``m``; the others are left
untouched (multiplied by exactly 1). The norm is computed from the rank x rank Gram
matrices, ``||B A||^2 = sum((A A^T) * (B^T B))``, without forming the out x in product.

``apply`` returns sd-scripts' three figures: the number of modules scaled
(``max_norm/keys_scaled``), the mean and the largest norm after scaling
(``max_norm/average_key_norm``, ``max_norm/max_key_norm``); and the largest before
(``max_norm/max_key_norm_before``).
"""

from __future__ import annotations

import torch
from peft.tuners.lora import layer as peft_layer

from ..errors import UserError


def lora_factors(models: list) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(down weight, up weight, scale) of every plain LoRA module of ``models``."""
    out = []
    for model in models:
        for layer in model.modules():
            if not isinstance(layer, peft_layer.LoraLayer) or not hasattr(layer, "base_layer"):
                continue
            if not isinstance(layer, (peft_layer.Linear, peft_layer.Conv2d)) or layer.lora_variant \
                    or len(layer.lora_A) != 1:
                raise UserError(f"--scale-weight-norms applies to plain LoRA layers only, and {type(layer).__name__} "
                                "is not one: drop it")
            name = next(iter(layer.lora_A))
            out.append((layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])))
    return out


def delta_norms(factors: list) -> torch.Tensor:
    """The Frobenius norm of each module's delta ``s * B @ A``, in fp32."""
    norms = []
    for down, up, scale in factors:
        a, b = down.detach().float().flatten(1), up.detach().float().flatten(1)
        norms.append((a @ a.t()).mul_(b.t() @ b).sum().clamp_(min=0).sqrt() * abs(scale))
    return torch.stack(norms)


@torch.no_grad()
def apply(factors: list, max_norm: float) -> dict[str, float]:
    """Scale every module whose delta's norm is above ``max_norm`` down to it."""
    if not factors:
        return {}
    norms = delta_norms(factors)
    over = norms > max_norm
    ratio = torch.where(over, max_norm / norms.clamp(min=max_norm / 2), torch.ones_like(norms))
    root = ratio.sqrt()
    for k, (down, up, _) in enumerate(factors):
        down.mul_(root[k].to(down.dtype))
        up.mul_(root[k].to(up.dtype))
    after = norms * ratio
    scaled, mean, largest, before = torch.stack([over.sum().float(), after.mean(), after.max(), norms.max()]).tolist()
    return {"max_norm/keys_scaled": int(scaled), "max_norm/average_key_norm": mean, "max_norm/max_key_norm": largest,
            "max_norm/max_key_norm_before": before}
