"""Opt-in fused CPU path (``fused=True``): each rule as one pass of a small C loop.

Every rule file registers its C source here. The loops are compiled once with the
system C compiler into a cached shared library and called through ctypes: no torch
headers, so a build takes about a second, and nothing here is needed by the default
path. Each call walks a list of contiguous tensors (given as data pointers) and updates
parameter and state in a single read/write pass per element, which is what makes
torch's own ``AdamW(fused=True)`` fast on CPU; threads split the list by element count.
Returns ``None`` from ``library()`` when no compiler is available.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_HEADER = "#include <math.h>\n#include <stdint.h>\n#include <stdlib.h>\n"
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", "-std=gnu11"]
_SOURCES: dict[str, str] = {}
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_pool: ThreadPoolExecutor | None = None


def register(name: str, source: str) -> None:
    _SOURCES[name] = source


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return ""


def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first use; None if that is impossible."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is not None or _error is not None:
            return _lib
        source = _HEADER + "\n".join(_SOURCES[k] for k in sorted(_SOURCES))
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if cc is None:
            _error = "no C compiler found"
            return None
        # -march=native code is only valid on this CPU: key the cache on it.
        key = hashlib.sha256("\0".join([source, cc, *_FLAGS, _cpu_id()]).encode()).hexdigest()[:20]
        cache = os.environ.get("EMO_OPTIM_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "emo_optim")
        path = os.path.join(cache, f"emo_kernels_{key}.so")
        try:
            if not os.path.exists(path):
                os.makedirs(cache, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=cache) as tmp:
                    src = os.path.join(tmp, "k.c")
                    with open(src, "w") as f:
                        f.write(source)
                    out = os.path.join(tmp, "k.so")
                    subprocess.run([cc, *_FLAGS, src, "-o", out, "-lm"], check=True,
                                   capture_output=True, timeout=120)
                    os.replace(out, path)  # atomic: concurrent ranks may build too
            _lib = ctypes.CDLL(path)
        except (OSError, subprocess.SubprocessError) as exc:
            _error = f"building the fused kernels failed: {exc}"
        return _lib


def available() -> bool:
    return library() is not None


def _ptrs(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def _split(numels: list[int], parts: int) -> list[tuple[int, int]]:
    total = sum(numels)
    bounds, lo, acc = [], 0, 0
    for i, n in enumerate(numels):
        acc += n
        if len(bounds) < parts - 1 and acc * parts >= total * (len(bounds) + 1):
            bounds.append((lo, i + 1))
            lo = i + 1
    bounds.append((lo, len(numels)))
    return [b for b in bounds if b[0] < b[1]]


def launch(fn_name: str, dtype: torch.dtype, lists: list[list[torch.Tensor]],
           ints: list[list[int]], scalars: list[float]) -> None:
    """Run kernel ``fn_name`` (suffixed by dtype) over parallel tensor lists.

    ``lists``: tensors passed by data pointer; ``ints``: per-tensor integers (numel, ...);
    ``scalars``: doubles. Threads take contiguous slices balanced by element count.
    """
    global _pool
    lib = library()
    fn = getattr(lib, f"{fn_name}_{'f64' if dtype == torch.float64 else 'f32'}")
    arrays = [_ptrs(ts) for ts in lists] + [torch.tensor(v, dtype=torch.int64) for v in ints]
    base = [a.data_ptr() for a in arrays]
    doubles = [ctypes.c_double(x) for x in scalars]

    def run(lo: int, hi: int) -> None:
        fn(ctypes.c_int64(hi - lo), *[ctypes.c_void_p(b + 8 * lo) for b in base], *doubles)

    threads = max(1, torch.get_num_threads())
    parts = _split(ints[0], threads) if threads > 1 and len(ints[0]) > 1 else [(0, len(ints[0]))]
    if len(parts) == 1:
        run(*parts[0])
        return
    if _pool is None or _pool._max_workers != threads:
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="emo_fused")
    for f in [_pool.submit(run, lo, hi) for lo, hi in parts]:
        f.result()


def eligible(*lists: list[torch.Tensor]) -> bool:
    """The C loops index memory linearly: every tensor must be contiguous on the CPU."""
    return all(t.device.type == "cpu" and t.is_contiguous() for ts in lists for t in ts)
