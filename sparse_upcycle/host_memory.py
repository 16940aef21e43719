"""Host allocator settings for XLA on CPU: keep freed memory in the process.

XLA's CPU runtime allocates each execution's temporaries as one block (about 240 MB for a step
of the tiny ViT compare config) from a worker thread. With glibc's defaults a block that large
is served by ``mmap`` and returned with ``munmap`` after every step, so each step faults the
whole block back in page by page: on a 2-core machine that was ~59,000 page faults and ~0.11 s
of kernel time per 0.16 s step. ``tune()`` tells glibc (``mallopt``) to serve such blocks from
its heap and keep them: one arena (``M_ARENA_MAX``; a non-main arena falls back to ``mmap`` for
blocks above its 64 MB heap), no ``mmap`` for large blocks (``M_MMAP_MAX``), and up to 1 GB of
free heap kept before trimming (``M_TRIM_THRESHOLD``). ``scripts/bench_loop.py`` measures the
step with and without it.

Called by the command line and the test suite before jax starts its threads (it only affects
threads that allocate for the first time afterwards). Set ``SPARSE_UPCYCLE_MALLOC=system`` to
keep glibc's defaults; on a system without glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "SPARSE_UPCYCLE_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD_BYTES = 1 << 30

_done: bool | None = None


def tune() -> bool:
    """Apply the settings once per process; True when they are in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get(ENV, "") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = [
        mallopt(_M_ARENA_MAX, 1),
        mallopt(_M_MMAP_MAX, 0),
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
    ]
    _done = all(r == 1 for r in ok)
    return _done
