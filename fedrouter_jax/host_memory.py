"""Keep freed host memory inside the process, so XLA:CPU's per-call buffers are not page-faulted
in again on every call.

XLA:CPU allocates one call's temporaries (about 0.9 GiB for a 34M-parameter training step at
B 16, T 128) with `malloc` and frees them when the call ends. glibc serves such large blocks with
`mmap` and gives them back to the kernel on `free`, so the next call faults every 4 KiB page in
again and the kernel zero-fills it: 230k page faults and about 0.45 s of system CPU per call
(measured in BENCHMARKS.md). With mmap off, trimming off and one arena, freed blocks stay in the
heap and the next call reuses them.

The cost: the process's resident memory does not shrink after a peak (a simulation process keeps
re-using it). `FEDROUTER_RETAIN_HOST_MEMORY=0` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int

ENV_SWITCH = "FEDROUTER_RETAIN_HOST_MEMORY"
_applied = False


def retain_freed_memory() -> bool:
    """Set glibc malloc to keep freed memory (see the module docstring). Idempotent.

    Returns True when the settings are in effect; False on non-glibc platforms (macOS, musl) or
    when `FEDROUTER_RETAIN_HOST_MEMORY=0`. Call it early: blocks already mapped are not affected.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; all three or the heap still hands blocks back to the kernel
    ok = all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
    _applied = ok
    return ok
