"""Media types of the API: encoded formats and raw pixel buffers (shared by the control plane and the tools)."""

from __future__ import annotations

import io

from PIL import Image as PILImage

RAW_RGB = "image/x-raw-rgb8"
RAW_GRAY = "image/x-raw-gray8"
RAW_ANY = "image/x-raw"
"""Requested output: raw in the image's own channel count."""
RAW_TYPES = (RAW_RGB, RAW_GRAY)

ENCODED_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
"""Pillow format name -> media type, for every encoded input the tools accept."""

FALLBACK_TYPE = "image/png"


def probe(data: bytes) -> tuple[str, tuple[int, int]]:
    """Media type and size from an encoded header alone (no pixel decoding); PNG and (0, 0) when unreadable."""
    try:
        with PILImage.open(io.BytesIO(data)) as header:
            return ENCODED_TYPES.get(header.format or "", FALLBACK_TYPE), header.size
    except Exception:  # noqa: BLE001 - the tool will refuse bad bytes with a clear message
        return FALLBACK_TYPE, (0, 0)
