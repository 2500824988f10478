"""Host memory freed by one stage, given back to the system before the next.

glibc keeps what Python and PyTorch free inside its heaps for reuse; after a model build (gigabytes of
temporaries at 8B) the process stays that much larger through every later stage -- the 8B record's latency
stages sat at 38-50 GB. ``malloc_trim(0)`` returns the free pages of every heap; a no-op where libc has none.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


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
