"""Media type and size of an encoded image from its header alone (no pixel decoding)."""

from __future__ import annotations

import io

from imageflow.common.media import ENCODED_TYPES, FALLBACK_TYPE
from PIL import Image as PILImage


class _ViewReader(io.RawIOBase):
    """A read-only file over a buffer without copying it (io.BytesIO copies anything but bytes)."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self._view[self._position : self._position + len(buffer)]
        buffer[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position


def probe(data: bytes | memoryview) -> tuple[str, tuple[int, int]]:
    """Media type and size from an encoded header; PNG and (0, 0) when unreadable. Only the header is read."""
    try:
        with PILImage.open(io.BufferedReader(_ViewReader(data))) as header:
            return ENCODED_TYPES.get(header.format or "", FALLBACK_TYPE), header.size
    except Exception:  # noqa: BLE001 - the tool will refuse bad bytes with a clear message
        return FALLBACK_TYPE, (0, 0)
