"""Raw frames in POSIX shared memory (`/dev/shm`), for a control plane and tool services on one host: the writer
creates an object, hands its name over, and the caller that asked for it unlinks it. Only names this module made are
ever opened, so a request cannot make a tool read an arbitrary file."""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from pathlib import Path

from imageflow.common.errors import failed_precondition, invalid_argument

SHM_DIR = Path("/dev/shm")
PREFIX = "imageflow-"
NAME = re.compile(r"^imageflow-[0-9a-f]{32}$")


def write_region(data: bytes | memoryview) -> tuple[str, int]:
    """A new object holding `data`; returns its name and size."""
    name = PREFIX + uuid.uuid4().hex
    fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
    finally:
        os.close(fd)
    return name, len(data)


def read_region(name: str, byte_size: int) -> bytes:
    """The bytes of an object this module made; INVALID_ARGUMENT for any other name, FAILED_PRECONDITION when it is
    not there (the caller is on another host, or already unlinked it)."""
    if not NAME.match(name):
        raise invalid_argument(
            "SHARED_MEMORY_NAME_INVALID", f"shared memory name {name[:80]!r} is not one ImageFlow made"
        )
    try:
        with (SHM_DIR / name).open("rb") as handle:
            data = handle.read(byte_size + 1)
    except FileNotFoundError:
        raise failed_precondition(
            "SHARED_MEMORY_MISSING", f"shared memory {name} does not exist on this host (is the caller on another one?)"
        ) from None
    if len(data) != byte_size:
        raise invalid_argument(
            "SHARED_MEMORY_SIZE_MISMATCH", f"shared memory {name} holds {len(data)} bytes, the image says {byte_size}"
        )
    return data


def unlink_region(name: str) -> None:
    """Remove an object this module made (gone already is fine)."""
    if NAME.match(name):
        with contextlib.suppress(FileNotFoundError):
            (SHM_DIR / name).unlink()


def sweep_regions(older_than_s: float, now: float | None = None) -> int:
    """Remove the objects this module made that were last written more than `older_than_s` seconds ago (a frame lives
    for one execution; those a crashed control plane or an abandoned call left behind go); returns how many. Other
    files in /dev/shm are never touched."""
    cutoff = (time.time() if now is None else now) - older_than_s
    removed = 0
    for entry in SHM_DIR.glob(PREFIX + "*"):
        if not NAME.match(entry.name):
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.stat().st_mtime < cutoff:
                entry.unlink()
                removed += 1
    return removed
