"""Which process this is, and what processes do differently, under ``accelerate launch``
(or torchrun). Which process (``rank``, ``is_main``...) is read from torchrun's
environment without importing torch: the command line uses it to let one process take
the output folder's lock, clean it and speak for all. The rest imports torch when called.

Without GPUs, ``accelerate launch --multi_gpu --num_processes N`` runs N
CPU processes over gloo (accelerate's ``--cpu`` flag starts one process unless mpirun is
set up).

- Data: the processes take turns along one batch order (``Batches(rank=, world=)``), so
  in a step they train on different batches of the same epoch; the order's position is
  the same number on every process, and a checkpoint holds it once.
- Noise: each process draws from its own generator, seeded from (seed, rank); rank 0's
  is the single-process stream. A checkpoint holds every process's generator state.
- The step's loss is the mean over micro-batches and processes, the same number on every
  process (what the Emo family receives and run.json records); the same all-reduce
  carries whether any process was asked to stop.
- Encoding: with the disk cache (the default) the main process encodes and the others
  load its files (loop.py: ``main_process_first``), so an image goes through the VAE
  (and text encoders) once, not once per GPU; with --no-disk-cache each process encodes.
- A process killed (or crashed): the others find out in their next collective, which
  fails (``lost_peer``). Each holds the full LoRA and optimizer state, so a survivor saves
  its own replica as the checkpoint of the step it was on, without the dead process's
  noise stream (a resume from it continues, not bit-identically), and stops.
- ``EMOTRAIN_TRACE=1``: each process writes ``trace-rank-N.jsonl`` into the output folder
  (per micro-batch the images it trained on and its own loss, at the end a checksum of its
  LoRA), to check a multi-GPU set-up.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager

from ..disk.layout import RunFolder
from ..errors import PeerLost

NOISE_SEED_STRIDE = 1_000_003


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    return rank() == 0


def is_local_main() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0


def cpu_only_processes() -> bool:
    """Several processes and no GPU (CI, ``accelerate launch --multi_gpu`` on a CPU machine):
    accelerate needs to be told, or every process trains alone. gloo carries the traffic."""
    import torch
    return world_size() > 1 and not torch.cuda.is_available()


def noise_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps ``seed`` itself, so one process trains exactly as before."""
    return seed + NOISE_SEED_STRIDE * rank


def agree(accelerator, loss, stop_requested: bool) -> tuple[float, bool]:
    """-> (mean loss over processes, whether any process asked to stop)."""
    if accelerator.num_processes == 1:
        return loss.item(), stop_requested
    import torch
    both = torch.stack([loss.detach().double().reshape(()),
                        torch.tensor(float(stop_requested), dtype=torch.float64, device=loss.device)])
    total, stops = accelerator.reduce(both, reduction="sum").tolist()  # the step's one host sync
    return total / accelerator.num_processes, stops > 0


# What gloo and NCCL say when the other end of a collective is gone.
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
             "NCCL communicator was aborted", "Socket Timeout")


def lost_peer(exc: BaseException) -> str | None:
    """Which process a failed collective lost ("process 1", or "another process" with
    more than two), or None when ``exc`` is not a collective failing for a lost peer."""
    if world_size() == 1 or not isinstance(exc, RuntimeError):
        return None
    import torch.distributed as dist
    if not (isinstance(exc, getattr(dist, "DistBackendError", ())) or any(s in str(exc) for s in LOST_PEER)):
        return None
    return f"process {1 - rank()}" if world_size() == 2 else "another process"


@contextmanager
def collectives():
    """Around code that talks to the other processes: a collective that fails because a
    process is gone raises ``PeerLost``; any other error passes unchanged."""
    try:
        yield
    except RuntimeError as exc:
        peer = lost_peer(exc)
        if peer is None:
            raise
        raise PeerLost(peer) from None


def gather(accelerator, value) -> list:
    """Every process's ``value``, in rank order (a collective: all processes call it)."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object
    return gather_object([value])


def effective_batch_line(batch_size: int, grad_accum: int, processes: int) -> str:
    word = "process" if processes == 1 else "processes"
    return (f"effective batch {batch_size * grad_accum * processes} = batch {batch_size} x grad-accum {grad_accum} "
            f"x {processes} {word}")


class Trace:
    """EMOTRAIN_TRACE=1: what each process trained on, one JSON line per micro-batch."""

    def __init__(self, output, rank: int):
        self.path = RunFolder(output).trace(rank) if os.environ.get("EMOTRAIN_TRACE") == "1" else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def params(self, step: int, named_params: dict) -> None:
        if self.path:
            digest = hashlib.sha256()
            for name in sorted(named_params):
                digest.update(named_params[name].detach().cpu().contiguous().numpy().tobytes())
            self.write(step=step, lora_sha256=digest.hexdigest())
