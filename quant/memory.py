"""Memory: what a stage freed, given back to the system before the next; what a device has free.

glibc keeps what Python and PyTorch free inside its heaps for reuse; after a model build (gigabytes of
temporaries at 8B) the process stays that much larger through every later stage -- the 8B record's latency
stages sat at 38-50 GB. ``malloc_trim(0)`` returns the free pages of every heap; a no-op where libc has none.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def return_freed_memory() -> None:
    gc.collect()  # reference cycles (module graphs, hooks) first, so their tensors are free to give back
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def free_bytes(device) -> int:
    """What a new allocation can take on ``device``: on CUDA the driver's free memory plus what PyTorch's allocator
    holds unused; on the host ``MemAvailable`` (Linux), else the free physical pages."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
