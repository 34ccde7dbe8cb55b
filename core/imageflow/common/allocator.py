"""glibc malloc tuning for processes that allocate frame-sized buffers.

By default glibc serves every allocation above a (dynamic) threshold with a fresh `mmap` and gives it back with
`munmap` when freed. A decoded 1080p frame (6 MB) then costs about 1,500 page faults and the zeroing of every page, each
time: measured on the development machine, the one-process OpenCV chain of `bench/speed.py` takes 25–28 ms with the
default and 15–16 ms with frames reused from the heap. `tune_allocator` fixes the threshold (which also stops glibc's
dynamic adjustment) and keeps up to `trim_threshold` bytes of freed heap instead of returning it at once, so frames
below the threshold reuse memory; larger ones (an 8K frame) are still mapped and returned.

The price is memory kept after a burst (at most about the trim threshold per malloc arena). `0` keeps glibc's defaults.
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
"""Allocations up to 32 MiB (a 4K RGB frame is 24 MiB) come from the heap; the 32 MiB is also glibc's own upper
bound for its dynamic threshold on 64-bit systems, so this only makes its eventual state the starting one."""


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
