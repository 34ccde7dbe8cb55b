"""The control plane's side of the wire helpers (`imageflow.common.wire`): an Image's header read without its data."""

from __future__ import annotations

from imageflow.common.wire import LENGTH_DELIMITED, VARINT, Buffer, fields
from imageflow.server.domain.frames import ImageHeader


def image_header(image: Buffer) -> ImageHeader:
    """Media type, width and height of a serialized imageflow.v1.Image (data is skipped, not copied)."""
    media_type, width, height = "", 0, 0
    for number, wire_type, start, end in fields(image):
        if number == 2 and wire_type == LENGTH_DELIMITED:
            media_type = bytes(image[start:end]).decode("utf-8", "replace")
        elif number == 3 and wire_type == VARINT:
            width = start
        elif number == 4 and wire_type == VARINT:
            height = start
    return ImageHeader(media_type, width, height)
