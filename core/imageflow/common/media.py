"""Media types of the API: encoded formats and raw pixel buffers (shared by the control plane and the tools)."""

from __future__ import annotations

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
