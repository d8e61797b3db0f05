"""The weight change of a kohya/LyCORIS file's module, from LyCORIS' definitions alone
(lycoris/modules/locon.py, loha.py, lokr.py; written here without emotrain's code):

- LoRA: scale * up @ down, scale = alpha / rank (rank: lora_down's rows)
- DoRA (LyCORIS dora_wd, wd_on_out): W' = dora_scale * (W + dLoRA) / ||W + dLoRA||_row
- LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank (rank: hada_w1_b's rows)
- LoKr: kron(w1, w2) * scale; w1/w2 full or a @ b; scale 1 when both are full, else
  alpha / (the inner dimension of the decomposed one)
"""

import torch


def file_delta(parts: dict, base: torch.Tensor) -> torch.Tensor:
    """``parts``: a module's tensors by key suffix (alpha included), in float64;
    ``base``: the base weight (its shape, and DoRA's norm)."""
    p = {k: v.double() for k, v in parts.items()}
    W = base.double()
    if "hada_w1_a" in p:
        rank = p["hada_w1_b"].shape[0]
        d = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * (p["alpha"].item() / rank)
        return d.reshape(W.shape)
    if any(k.startswith("lokr_") for k in p):
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        if "lokr_w1" in p and "lokr_w2" in p:
            scale = 1.0
        else:
            scale = p["alpha"].item() / (p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else p["lokr_w1_b"].shape[0])
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2) * scale).reshape(W.shape)
    down, up = p["lora_down.weight"], p["lora_up.weight"]
    d = (up.flatten(1) @ down.flatten(1) * (p["alpha"].item() / down.shape[0])).reshape(W.shape)
    if "dora_scale" in p:
        merged = W + d
        norm = merged.reshape(W.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (W.ndim - 1))
        return merged * (p["dora_scale"] / norm) - W
    return d
