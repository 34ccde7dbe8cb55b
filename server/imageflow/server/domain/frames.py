"""How the executor holds a frame: serialized `Image` bytes it never parses, and the header it needs."""

from __future__ import annotations

from dataclasses import dataclass

Buffer = bytes | memoryview


@dataclass(frozen=True)
class ImageHeader:
    """What the control plane needs to know of an Image without touching its pixels."""

    media_type: str
    width: int
    height: int
