"""Raw frames in POSIX shared memory (`/dev/shm`), for a control plane and tool services on one host: the writer
creates an object, hands its name over, and the caller that asked for it unlinks it. Only names this module made are
ever opened, and only as regular files this user owns and alone may write, so a request cannot make a tool read
an arbitrary file (a link named like one is refused)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import queue
import re
import stat
import threading
import time
import uuid
from pathlib import Path

from imageflow.common.errors import failed_precondition, invalid_argument

log = logging.getLogger(__name__)

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
    """The bytes of an object this module made, copied out; INVALID_ARGUMENT for any other name or for an object that
    is not a regular file this user owns and alone may write (as `write_region` makes them: a link to another file,
    or a file somebody else made under such a name, is not read), FAILED_PRECONDITION when it is not there (the
    caller is on another host, or already unlinked it)."""
    fd, size = _open(name, byte_size)
    with open(fd, "rb") as handle:  # (closes the descriptor)
        return handle.read(size)


def map_region(name: str, byte_size: int) -> memoryview:
    """The bytes of an object this module made, mapped read-only instead of copied (1.8 ms saved on a raw 1080p
    frame here); the mapping outlives an unlink and lasts as long as the view and what is made from it. The same
    errors as `read_region`: a mapped file that shrinks kills the reader (SIGBUS), so only a file nobody else can
    truncate is mapped."""
    fd, size = _open(name, byte_size)
    try:
        if size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))  # (the mapping keeps its own descriptor)
    finally:
        os.close(fd)


def _open(name: str, byte_size: int) -> tuple[int, int]:
    """A descriptor of the object, checked (see `read_region`), and its size."""
    if not NAME.match(name):
        raise invalid_argument(
            "SHARED_MEMORY_NAME_INVALID", f"shared memory name {name[:80]!r} is not one ImageFlow made"
        )
    try:
        fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise failed_precondition(
            "SHARED_MEMORY_MISSING", f"shared memory {name} does not exist on this host (is the caller on another one?)"
        ) from None
    except OSError:  # a symbolic link (ELOOP), or not ours to read
        raise _foreign(name) from None
    try:
        facts = os.fstat(fd)
        if not stat.S_ISREG(facts.st_mode) or facts.st_uid != os.getuid() or facts.st_mode & 0o022:
            raise _foreign(name)
        if facts.st_size != byte_size:
            raise invalid_argument(
                "SHARED_MEMORY_SIZE_MISMATCH",
                f"shared memory {name} holds {facts.st_size} bytes, the image says {byte_size}",
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, facts.st_size


def _foreign(name: str) -> Exception:
    return invalid_argument(
        "SHARED_MEMORY_FOREIGN",
        f"shared memory {name} is not a file this user owns and alone may write (ImageFlow makes them 0600)",
    )


def unlink_region(name: str) -> None:
    """Remove an object this module made (gone already is fine)."""
    if NAME.match(name):
        with contextlib.suppress(FileNotFoundError):
            (SHM_DIR / name).unlink()


class Unlinker:
    """Unlinks objects on a thread of its own: giving a raw 1080p frame's pages back to the kernel takes about 1.3 ms
    here, which an event loop should not spend between one step and the next. `unlink` is called from
    `weakref.finalize` callbacks, which a garbage collection may run in the middle of any code, this class's too: it
    takes no lock that it could wait on (a `SimpleQueue`'s put is safe to re-enter). At exit the thread finishes what
    is queued (or the exit hook does it), and later frames are unlinked at once; what a killed process leaves, the
    sweep removes."""

    _STOP = object()

    def __init__(self) -> None:
        self._names: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._starting = threading.Lock()
        self._thread: threading.Thread | None = None
        self._exiting = False
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        """A forked child has none of the parent's threads: it starts its own, with nothing queued."""
        self._names, self._starting, self._thread = queue.SimpleQueue(), threading.Lock(), None

    def unlink(self, name: str) -> None:
        """Queue `name` to be unlinked; returns at once (once the process is exiting, unlinks it here)."""
        if self._exiting:
            self._unlink(name)
            return
        self._names.put(name)
        if self._thread is None and self._starting.acquire(blocking=False):  # never waits: see the class
            try:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="imageflow-shm-unlink", daemon=True)
                    self._thread.start()
            finally:
                self._starting.release()

    def settle(self) -> None:
        """Wait until every object queued so far is unlinked (at once when no thread runs: none started, or exiting)."""
        if self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()
        self._names.put(done)
        done.wait()

    def drain(self, wait_s: float = 5.0) -> None:
        """At exit: let the thread finish what is queued (up to `wait_s`), unlink what is left on this thread, and
        from now on unlink at once (frames that weakref.finalize's own exit hook lets go, whichever hook runs first)."""
        self._exiting = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._names.put(self._STOP)
            thread.join(wait_s)
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._names.get_nowait()
                if isinstance(item, str):
                    self._unlink(item)

    def _run(self) -> None:
        while (item := self._names.get()) is not self._STOP:
            if isinstance(item, threading.Event):
                item.set()
            elif isinstance(item, str):
                self._unlink(item)

    def _unlink(self, name: str) -> None:
        try:
            self._unlink_now(name)
        except Exception:  # left for the sweep; the thread goes on
            log.exception("shared memory: could not unlink %s", name)

    def _unlink_now(self, name: str) -> None:
        unlink_region(name)


UNLINKER = Unlinker()
atexit.register(UNLINKER.drain)


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
