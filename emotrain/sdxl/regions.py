"""Regional compilation of the UNet (``--compile``).

``compile_blocks(unet)`` compiles, in place, each of the UNet's repeated blocks (every
``BasicTransformerBlock`` and ``ResnetBlock2D``: on SDXL 70 transformer blocks and 22
resnets, a handful of distinct shapes) with ``torch.compile`` through ``Module.compile``:
the first step compiles one graph per block shape (seconds on the tiny model, not the
minutes of the whole UNet), later steps reuse them. ``Module.compile`` wraps nothing, so
the modules keep their names and ``named_parameters``/``state_dict`` have no
``_orig_mod.`` prefix: checkpoints and LoRA files are the same as without it. The rest of
the UNet (embeddings, down/up samplers, the projections around the transformer blocks)
runs eagerly. Compiled kernels may sum in another order than eager ones: the loss agrees
with eager's to float rounding, not bit for bit, and a compiled run resumed with
``--compile`` recompiles the same graphs, so its resume stays exact.

``check_compiler(device)`` compiles and runs a two-operation function (a new constant each
time, so that no cache of compiled code answers for the compiler) on ``device`` with
the same backend first, before the model loads, so that a platform that cannot compile
(no C compiler for the CPU's inductor, no triton for CUDA's) stops with one line instead
of at the first step. The backend is inductor; ``EMOTRAIN_COMPILE_BACKEND`` names
another (the tests use ``aot_eager``: the same tracing and autograd graphs, no kernels
generated, fast to build).
"""

from __future__ import annotations

import os
import time

from ..errors import UserError

REPEATED = ("BasicTransformerBlock", "ResnetBlock2D")  # diffusers' classes of the UNet's repeated blocks
BACKEND_ENV = "EMOTRAIN_COMPILE_BACKEND"
RECOMPILE_LIMIT = 64  # graphs per block class: its shapes, and a few more for buckets


def backend() -> str:
    return os.environ.get(BACKEND_ENV) or "inductor"


def repeated_blocks(unet) -> list:
    """The UNet's modules that ``compile_blocks`` compiles, in module order."""
    return [m for m in unet.modules() if type(m).__name__ in REPEATED]


def compile_blocks(unet) -> int:
    """torch.compile each repeated block of ``unet`` in place; -> how many. The blocks of
    one class share their code, compiled once per distinct shape (SDXL's resnets have a
    dozen channel pairs): dynamo's default limit of 8 graphs per code would run the rest
    eagerly, so it is raised to 64."""
    import torch

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = repeated_blocks(unet)
    for block in blocks:
        block.compile(backend=backend())
    return len(blocks)


def check_compiler(device) -> None:
    """Compile and run ``x * 2 + c`` on ``device``; UserError (one line) if it cannot."""
    import torch

    torch._dynamo.reset()
    constant = float(time.time_ns() % 997)  # a new kernel each time: no compiled-code cache can answer for the compiler
    try:
        out = torch.compile(lambda x: x * 2 + constant, backend=backend())(torch.ones(4, device=device))
        ok = bool((out == 2 + constant).all())
    except Exception as e:  # noqa: BLE001 - any failure of the compiler toolchain is the same answer
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"--compile: torch.compile cannot compile on this machine ({type(e).__name__}: {reason}); "
                        "install a C/C++ compiler (CPU) or triton (CUDA), or train without --compile") from None
    finally:
        torch._dynamo.reset()
    if not ok:
        raise UserError("--compile: a test function compiled by torch.compile gave a wrong result on this machine; "
                        "train without --compile")
