"""The C allocator setting for CPU runs: glibc's malloc keeps freed memory for reuse.

Every inner step frees blocks of the sizes the next one allocates (activations, gradients,
the Hessian-vector products' graphs). By default glibc serves large blocks with fresh
``mmap`` calls and hands freed heap back to the system, so each step faults the same pages in
again; with no mmap and no trimming, the blocks are reused. ``python run.py`` sets this on CPU
unless ``--no-keep-freed-memory`` (measured with ``python -m benchmarks.variants --loop
engine``: docs/performance.md). The cost: freed memory stays with the process until it exits,
and without mmap large blocks fragment the heap (a peak up to 20% higher at the largest
benchmarked tasks, reached at the first meta-step and flat after it).
"""

from __future__ import annotations

import ctypes

__all__ = ["keep_freed_memory"]

# glibc's malloc.h
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 256 << 20))


def keep_freed_memory() -> bool:
    """Apply the setting to this process (from now on); False where the C library has no
    glibc ``mallopt`` (macOS, musl: nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(option, value) == 1 for option, value in SETTINGS])
