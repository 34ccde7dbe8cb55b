"""How the executor holds a frame: serialized `Image` bytes it never parses, or a frame a local invoker keeps decoded
(the embedded tools' pixels), known to the executor only by its header and how to serialize it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from imageflow.common.wire import Buffer


@dataclass(frozen=True)
class ImageHeader:
    """What the control plane needs to know of an Image without touching its pixels."""

    media_type: str
    width: int
    height: int


class LocalFrame(Protocol):
    """A decoded frame held in this process by the invoker that produced it."""

    @property
    def header(self) -> ImageHeader:
        """Media type (raw) and size."""
        ...  # pragma: no cover

    def serialized(self) -> bytes:
        """The frame as a serialized imageflow.v1.Image (raw pixels), for a remote tool or an output."""
        ...  # pragma: no cover


Frame = Buffer | LocalFrame


def serialized(frame: Frame) -> Buffer:
    """The frame as serialized Image bytes, converting a local frame."""
    if isinstance(frame, bytes | memoryview):
        return frame
    return frame.serialized()


def inline(frame: Frame) -> Buffer:
    """The frame as a serialized Image with its pixels in `data` (a frame kept in shared memory is read back), for
    consumers that cannot read a handle."""
    materialize = getattr(frame, "inline", None)
    return materialize() if materialize is not None else serialized(frame)


@dataclass(frozen=True)
class InputImage:
    """A pipeline input as the executor holds it: the serialized imageflow.v1.Image to hand to the first tool, its
    encoded bytes and declared fields. The API fills it with views of the request's own bytes, so an input is not
    copied on its way to the first tool (an 8K PNG is 18 MB)."""

    serialized: Buffer
    data: Buffer
    media_type: str
    width: int
    height: int
