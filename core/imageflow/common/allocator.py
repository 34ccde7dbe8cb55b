"""glibc malloc tuning for processes that allocate frame-sized buffers.

glibc serves large allocations with a fresh `mmap` (the threshold starts at 128 KiB and only rises as mapped blocks
are freed) and returns freed memory at the top of the heap to the kernel once more than the trim threshold is free.
Either way a frame buffer often lands in pages the kernel has to fault in and zero again. Measured on the development
machine: a decode / resize / encode round on a 1080p JPEG faults in thousands of pages with glibc's defaults and none
with this tuning (`tests/test_allocator.py`), and the one-process OpenCV chain of `bench/speed.py` takes 25–28 ms
untuned and 15–16 ms tuned. `tune_allocator` fixes the mmap threshold (which also stops its dynamic adjustment) and
sets the trim threshold to twice that, so buffers below the threshold reuse freed heap memory; larger ones (an 8K
frame) are still mapped and returned.

The price is memory kept after a burst (up to about the trim threshold per malloc arena). `0` keeps glibc's defaults.
Other C libraries (musl) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 32 * 1024 * 1024
"""Allocations up to 32 MiB (a 4K RGB frame is 24 MiB) come from the heap (32 MiB is also the most glibc's dynamic
threshold ever reaches on 64-bit systems)."""


def tune_allocator(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Set glibc's mmap threshold to `mmap_threshold` bytes and its trim threshold to twice that; returns whether it
    was applied (False with 0, on another C library, or when glibc refuses the values)."""
    if mmap_threshold <= 0 or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, 2 * mmap_threshold)
        )
    except (OSError, AttributeError):
        return False
    if applied:
        log.debug("malloc: mmap threshold %d bytes, trim threshold %d bytes", mmap_threshold, 2 * mmap_threshold)
    return applied
