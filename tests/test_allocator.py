"""glibc allocator tuning: frame-sized buffers reuse heap memory instead of fresh, page-faulting mmaps."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
from imageflow.common.allocator import tune_allocator

PROBE = """
import resource, sys
import cv2, numpy as np
from imageflow.common.allocator import tune_allocator
applied = tune_allocator(int(sys.argv[1]))
jpeg = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 255, (1080, 1920, 3), np.uint8))[1].tobytes()
def work():  # what a tool does with a 1080p JPEG
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    small = cv2.resize(img, (960, 540), interpolation=cv2.INTER_AREA)
    cv2.imencode(".jpg", cv2.GaussianBlur(small, (0, 0), 2))
work()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    work()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(threshold: int) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold)], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning applies to glibc only")
def test_tuned_frames_reuse_memory_and_untuned_ones_fault_every_page() -> None:
    applied, tuned = _faults(32 * 1024 * 1024)
    untouched, default = _faults(0)
    assert applied == "True" and untouched == "False"
    frame_pages = 1080 * 1920 * 3 // 4096
    assert default > 2 * frame_pages  # glibc's default: decoded frames land in fresh pages, faulted in each time
    assert tuned < frame_pages // 10  # tuned: the freed frames' heap memory is reused


def test_zero_keeps_the_defaults() -> None:
    assert tune_allocator(0) is False
