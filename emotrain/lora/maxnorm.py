"""Max-norm of each LoRA module's delta (``--scale-weight-norms``), as sd-scripts defines it
(networks/lora.py, ``apply_max_norm_regularization``), for the ``lora`` kind.

After each optimizer step, for every LoRA module with down ``A`` (rank x in, or a conv
kernel rank x in x kh x kw), up ``B`` (out x rank) and scale ``s = alpha / rank``, the
delta is ``D = s * B @ A`` (a 3x3 conv's kernel: the same product over the flattened
kernel) and its norm the Frobenius norm ``||D||``. Where ``||D|| > m`` both factors are
multiplied by ``sqrt(m / ||D||)``, so the delta's norm becomes ``m``; the others are left
untouched. The norm is computed from the rank x rank Gram matrices,
``||B A||^2 = sum((A A^T) * (B^T B))``, without forming the out x in product.

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


def delta_norms(factors: list) -> list[float]:
    """The Frobenius norm of each module's delta ``s * B @ A`` (fp32 arithmetic). Modules
    of the same shapes go through one batched product: a handful of operations and one
    transfer to the host per step, not a dozen operations per module."""
    groups: dict[tuple, list[int]] = {}
    for k, (down, up, _) in enumerate(factors):
        groups.setdefault((down.shape, up.shape, down.device), []).append(k)
    order, squares = [], []
    for members in groups.values():
        a = torch.stack([factors[k][0].detach() for k in members]).float().flatten(2)  # (n, rank, in)
        b = torch.stack([factors[k][1].detach() for k in members]).float().flatten(2)  # (n, out, rank)
        squares.append((a @ a.transpose(1, 2)).mul_(b.transpose(1, 2) @ b).sum((1, 2)))
        order += members
    values = torch.cat([q.to(squares[0].device) for q in squares]).tolist()  # the one host sync
    norms = [0.0] * len(factors)
    for k, square in zip(order, values):
        norms[k] = max(square, 0.0) ** 0.5 * abs(factors[k][2])
    return norms


@torch.no_grad()
def apply(factors: list, max_norm: float) -> dict[str, float]:
    """Scale every module whose delta's norm is above ``max_norm`` down to it (both factors
    times ``sqrt(max_norm / norm)``, in one call); the others are not touched."""
    if not factors:
        return {}
    norms = delta_norms(factors)
    over = [k for k, norm in enumerate(norms) if norm > max_norm]
    if over:
        roots = [(max_norm / norms[k]) ** 0.5 for k in over]
        torch._foreach_mul_([factors[k][i] for i in (0, 1) for k in over], roots + roots)
    after = [min(norm, max_norm) for norm in norms]
    return {"max_norm/keys_scaled": len(over), "max_norm/average_key_norm": sum(after) / len(after),
            "max_norm/max_key_norm": max(after), "max_norm/max_key_norm_before": max(norms)}
