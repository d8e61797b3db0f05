"""The training precisions, named once. Torch is imported only when a dtype is asked
for, so the command line can check a precision name without loading torch."""

from __future__ import annotations

PRECISIONS = ("no", "fp16", "bf16")  # accelerate's names for --mixed-precision


def weight_dtype(name: str):
    """The dtype of the frozen base weights under ``--mixed-precision name``. The LoRA,
    its gradients and optimizer state stay float32 whatever this is."""
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def label(name: str) -> str:
    return "fp32" if name == "no" else name
