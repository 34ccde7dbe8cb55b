"""Media type and size of an encoded image from its header alone (no pixel decoding)."""

from __future__ import annotations

import io

from imageflow.common.media import ENCODED_TYPES, FALLBACK_TYPE
from PIL import Image as PILImage


def probe(data: bytes) -> tuple[str, tuple[int, int]]:
    """Media type and size from an encoded header; PNG and (0, 0) when unreadable."""
    try:
        with PILImage.open(io.BytesIO(data)) as header:
            return ENCODED_TYPES.get(header.format or "", FALLBACK_TYPE), header.size
    except Exception:  # noqa: BLE001 - the tool will refuse bad bytes with a clear message
        return FALLBACK_TYPE, (0, 0)
