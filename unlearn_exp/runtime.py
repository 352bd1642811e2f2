"""Process settings for speed that change no number.

``keep_freed_memory()``: on Linux with glibc, a CPU UNet call allocates its activations (megabytes
each) and frees them again; glibc hands large freed blocks back to the kernel (those above its mmap
threshold, and the top of the heap past its trim threshold), so the next call faults every page in
again (about 20,000 page faults per toy UNet call). Raising the mmap threshold to glibc's maximum
(32 MiB) and the trim threshold to 1 GiB keeps the freed memory for the next call: on two cores a
loop of toy UNet calls runs about 20% faster and the toy demo 12% (measured in docs/toy.md's toy
section). Only where memory comes from changes; torch aligns every CPU tensor to 64 bytes either
way, so every result is the same to the bit (tested; the toy demo's tables are identical).
``UNLEARN_EXP_MALLOC=default`` leaves the allocator as it is. Called once per process by the
sampler, the trainers and the benchmark scripts.

``device(name)``: the torch device a ``device`` setting names (``auto`` or null: CUDA where there is
one, else the CPU), for the evaluation models (PP, Q16, utility metrics).
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper bound for it on 64-bit systems
TRIM_THRESHOLD = 1024 * 1024 * 1024

_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Set the two glibc thresholds once per process; True where they are set."""
    if "done" in _state:
        return _state["done"]
    ok = False
    if os.environ.get("UNLEARN_EXP_MALLOC", "keep") != "default" and platform.libc_ver()[0] == "glibc":
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            )
        except (OSError, AttributeError):  # no mallopt in this C library
            ok = False
    _state["done"] = ok
    return ok


def device(name: str | None):
    """``torch.device`` of a ``device`` setting: ``auto``/null picks CUDA where available, else CPU."""
    import torch

    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
