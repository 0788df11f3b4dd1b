"""How the run's process hands memory back: freed image-sized arrays are kept for the next image.

glibc's malloc serves an array of more than 32 MiB (any map of an 8192^2 image) with a fresh
``mmap`` and unmaps it when freed, and each thread allocates from an arena of its own that gives
its free memory back. The kernel zeroes every fresh page on first touch, which took a quarter
of the CPU of a run of 8192^2 images (``perf``: ``clear_page_erms``), for arrays the next image
allocates again at once. :func:`reuse_freed_memory` makes every thread allocate from one arena,
large arrays included, and keeps what is freed for the next allocation (benchmarks/RESULTS.md,
issue 15 round 3: 20-30% less system CPU on the surveys measured, 80-120 MB less peak memory on
those of 2048^2 images, the same on 8192^2).
"""

from __future__ import annotations

import ctypes
import sys

#: mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
#: M_TRIM_THRESHOLD of -1: the heap is never trimmed (mallopt(3))
NEVER = -1


def reuse_freed_memory() -> bool:
    """One malloc arena for every thread started after this call, no ``mmap`` for large blocks and
    no trimming of the heap: a freed array's memory serves the next one. Returns whether glibc took
    the settings (False on other C libraries and systems, where nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([mallopt(M_ARENA_MAX, 1), mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, NEVER)])
