"""Large images in pieces: the streaming RPCs (`ExecutePipelineUpload`, `ToolService.ProcessChainStream`) send an
image's length first and then its bytes in pieces, so no gRPC message is larger than a piece. The receiver allocates
the declared length once and copies each piece into place: the image is held once, not three times over as gRPC's
receive path holds a unary message."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
from collections.abc import AsyncIterator, Iterator

Buffer = bytes | bytearray | memoryview
"""Bytes, or a view of them (never copied to be read)."""
PIECE_BYTES = 64 * 1024
"""Bytes per piece. gRPC copies each message two or three times on its way in and buffers up to its flow-control
window of them; with small pieces those copies stay small and reuse the same heap memory. An 8K PNG (18 MB) is 288
pieces: a few milliseconds of per-message cost against seconds of work. Measured by the 8K row of `make bench`: 1 MiB
pieces left 2.9-3.2x the encoded bytes in the control plane, 256 KiB 2.6-2.8x, 64 KiB 2.4-2.6x."""


class PieceError(ValueError):
    """Pieces that do not add up to the declared length."""


def pieces(data: Buffer, size: int = PIECE_BYTES) -> Iterator[memoryview]:
    """`data` in consecutive views of at most `size` bytes (none for empty data)."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), size):
        yield view[start : start + size]


class Assembly:
    """One image's bytes, declared up front and filled in order. `prefix` goes before them in the same buffer (the
    control plane puts a serialized Image's other fields and the `data` key there, so the result is that Image).

    The buffer is a bytearray, or with `mapped` an anonymous memory map: its pages go back to the system the moment
    the last view of it goes, instead of staying in the heap for the process's next allocations (a long-lived server
    that assembles an 18 MB frame now and then keeps its footprint that way). With `counting` nothing is kept: the
    pieces are only counted against the declared length (bytes the receiver has no use for)."""

    def __init__(self, declared: int, prefix: bytes = b"", *, mapped: bool = False, counting: bool = False) -> None:
        if declared < 0:
            raise PieceError(f"declared length {declared} is negative")
        self.declared = declared
        size = 0 if counting else len(prefix) + declared
        self._buffer: bytearray | memoryview = memoryview(mmap.mmap(-1, size)) if mapped and size else bytearray(size)
        self._buffer[: len(prefix)] = b"" if counting else prefix
        self._counting = counting
        self._start = self._at = 0 if counting else len(prefix)

    @property
    def received(self) -> int:
        """Bytes of the image received so far."""
        return self._at - self._start

    def add(self, piece: Buffer) -> None:
        """Copy the next piece into place; raises PieceError when it goes past the declared length."""
        if self.received + len(piece) > self.declared:
            raise PieceError(f"{self.received + len(piece)} bytes received, {self.declared} declared")
        end = self._at + len(piece)
        if not self._counting:
            self._buffer[self._at : end] = piece
        self._at = end

    def result(self) -> memoryview:
        """The prefix and the image (nothing when counting); raises PieceError when fewer bytes than declared
        arrived."""
        if self.received != self.declared:
            raise PieceError(f"{self.received} bytes received, {self.declared} declared")
        return memoryview(self._buffer)


DRAIN_S = 10.0
"""How long a refusing receiver keeps reading a caller's remaining pieces (see `drain`)."""


async def drain(messages: AsyncIterator[object], within_s: float = DRAIN_S) -> None:
    """Read and drop the rest of a request stream, for at most `within_s` seconds. A receiver that refuses a stream
    part-way does this before it answers: a grpc.aio caller still writing when the call ends gets its write failing
    with INTERNAL in place of the receiver's status (grpc/grpc#36066); once it has sent everything, it reads the
    status it was given."""
    with contextlib.suppress(Exception):  # out of time, a bad message, the caller gone: the refusal stands
        async with asyncio.timeout(within_s):
            async for _ in messages:
                pass
