"""The training precisions, named once, and the one way tensors go from the host to the
device. Torch is imported only when a dtype is asked for, so the command line can check
a precision name without loading torch."""

from __future__ import annotations

PRECISIONS = ("no", "fp16", "bf16")  # accelerate's names for --mixed-precision


def weight_dtype(name: str):
    """The dtype of the frozen base weights under ``--mixed-precision name``. The LoRA,
    its gradients and optimizer state stay float32 whatever this is."""
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def to_device(tensor, device):
    """``tensor`` on ``device``; from the host to a GPU through pinned memory without
    blocking the host (the copy is ordered on the stream like any kernel)."""
    import torch

    if tensor.device.type != "cpu" or torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def label(name: str) -> str:
    return "fp32" if name == "no" else name
