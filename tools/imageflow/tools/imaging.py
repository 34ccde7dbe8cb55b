"""Decoding, encoding and raw pixel buffers, with the limits every tool enforces."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from imageflow.common.errors import invalid_argument, resource_exhausted
from imageflow.common.media import ENCODED_TYPES, RAW_ANY, RAW_GRAY, RAW_RGB, RAW_TYPES
from imageflow.common.pieces import Buffer
from PIL import Image as PILImage

Pixels = npt.NDArray[Any]
"""H x W x 3 (RGB) or H x W (gray), dtype uint8."""

_EXTENSION = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/bmp": ".bmp",
    "image/tiff": ".tiff",
}
DEFAULT_QUALITY = 90


@dataclass(frozen=True)
class ImageLimits:
    """What a tool refuses to decode."""

    max_pixels: int = 100_000_000
    max_encoded_bytes: int = 64 * 1024 * 1024


@dataclass
class DecodedImage:
    """Pixels plus the media type they arrived in."""

    pixels: Pixels
    source_media_type: str
    source_size: tuple[int, int] | None = None
    """The encoded size when the pixels were decoded smaller (shrink-on-load), else None."""


def channels_of(pixels: Pixels) -> int:
    """1 for gray, 3 for RGB."""
    return 1 if pixels.ndim == 2 else int(pixels.shape[2])


def _check_pixels(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise invalid_argument("IMAGE_EMPTY", f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise resource_exhausted(
            "IMAGE_TOO_MANY_PIXELS",
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels} pixels",
        )


_REDUCED_FLAGS = {
    (2, False): cv2.IMREAD_REDUCED_COLOR_2, (4, False): cv2.IMREAD_REDUCED_COLOR_4, (8, False): cv2.IMREAD_REDUCED_COLOR_8,
    (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2, (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}  # fmt: skip


def decode(
    data: Buffer,
    media_type: str,
    width: int,
    height: int,
    limits: ImageLimits,
    reduction: Callable[[int, int], int] | None = None,
    on_header: Callable[[int, int], None] | None = None,
    luma: bool = False,
) -> DecodedImage:
    """Turn request bytes into pixels, refusing corrupt, unsupported or oversized input. `reduction`, given the
    encoded size, may ask for a JPEG (without an EXIF rotation) to be decoded at 1/2, 1/4 or 1/8 of its size.
    `on_header` sees the size before any pixel is decoded, and may refuse by raising. `luma` asks for one gray
    channel: a JPEG is decoded as its Y plane alone (libjpeg skips the chroma), anything else is converted to gray
    right after decoding."""
    if not data:
        raise invalid_argument("IMAGE_MISSING", "image.data is empty")
    if media_type in RAW_TYPES:
        _check_pixels(width, height, limits)
        if on_header is not None:
            on_header(width, height)
        raw = _decode_raw(data, media_type, width, height, limits)
        if luma:  # labelled as what it now is: nothing may hand the RGB bytes on as these pixels
            raw = to_gray(raw)
            return DecodedImage(raw, raw_media_type(raw))
        return DecodedImage(raw, media_type)
    if len(data) > limits.max_encoded_bytes:
        raise resource_exhausted(
            "IMAGE_TOO_LARGE",
            f"encoded image is {len(data)} bytes, over the limit of {limits.max_encoded_bytes} bytes",
        )
    if media_type and media_type not in _EXTENSION:
        raise invalid_argument(
            "IMAGE_UNSUPPORTED_TYPE",
            f"media_type {media_type!r} is not supported; use PNG, JPEG, WebP, BMP, TIFF or {RAW_RGB} / {RAW_GRAY}",
        )
    fmt, size, mode, upright = _sniff(data)
    _check_pixels(size[0], size[1], limits)
    if on_header is not None:
        on_header(*size)
    if fmt == "JPEG" and not _ends_like_a_jpeg(data):
        raise invalid_argument(
            "IMAGE_TRUNCATED",
            f"JPEG data of {len(data)} bytes has no end-of-image marker near its end: the file is incomplete",
        )
    gray = mode in ("1", "L", "I;16", "I") or (luma and fmt == "JPEG" and mode == "RGB")
    flag = cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR
    factor = reduction(*size) if reduction is not None and fmt == "JPEG" and upright and mode in ("L", "RGB") else 1
    if factor in (2, 4, 8):
        flag = _REDUCED_FLAGS[(factor, gray)]
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    reduced = size if decoded is not None and factor in (2, 4, 8) else None
    if decoded is None:
        decoded = _decode_with_pillow(data, mode)
    elif decoded.ndim == 3:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2GRAY if luma else cv2.COLOR_BGR2RGB)
    if luma and decoded.ndim == 3:
        decoded = to_gray(decoded)
    return DecodedImage(np.ascontiguousarray(decoded), ENCODED_TYPES[fmt], reduced)


def _ends_like_a_jpeg(data: Buffer) -> bool:
    """A whole JPEG ends with its EOI marker (FFD9), perhaps followed by a little trailing data; a truncated one
    (half a download) does not. An embedded thumbnail's EOI sits near the start, so it does not count."""
    window = bytes(data[-65538:])  # an EOI further from the end fails the distance test anyway
    found = window.rfind(b"\xff\xd9")
    end = len(data) - len(window) + found
    return found >= 0 and end >= len(data) // 2 and len(data) - end <= 65536


def _sniff(data: Buffer) -> tuple[str, tuple[int, int], str, bool]:
    """Format, size, mode and whether no EXIF rotation applies, from the header alone (no pixel decode)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data)) as probe:
                fmt = probe.format or ""
                size = probe.size
                mode = probe.mode
                upright = fmt != "JPEG" or probe.getexif().get(0x0112, 1) == 1
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        raise resource_exhausted(
            "IMAGE_TOO_MANY_PIXELS",
            f"image header declares more than {PILImage.MAX_IMAGE_PIXELS} pixels (the decoder's bomb limit)",
        ) from None
    except Exception:  # noqa: BLE001 - any parser failure means the bytes are not an image we accept
        raise invalid_argument(
            "IMAGE_CORRUPT", "image data is corrupt or not a PNG, JPEG, WebP, BMP or TIFF file"
        ) from None
    if fmt not in ENCODED_TYPES:
        raise invalid_argument(
            "IMAGE_UNSUPPORTED_TYPE",
            f"image format {fmt or 'unknown'} is not supported; use PNG, JPEG, WebP, BMP or TIFF",
        )
    return fmt, size, mode, upright


def _decode_with_pillow(data: Buffer, mode: str) -> Pixels:
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            img.load()
            converted = img.convert("L" if mode in ("1", "L") else "RGB")
            return np.asarray(converted, dtype=np.uint8)
    except Exception:  # noqa: BLE001
        raise invalid_argument("IMAGE_CORRUPT", "image data is corrupt (decoding failed)") from None


def _decode_raw(data: Buffer, media_type: str, width: int, height: int, limits: ImageLimits) -> Pixels:
    _check_pixels(width, height, limits)
    channels = 3 if media_type == RAW_RGB else 1
    expected = width * height * channels
    if len(data) != expected:
        raise invalid_argument(
            "IMAGE_RAW_SIZE_MISMATCH",
            f"{media_type} buffer has {len(data)} bytes, expected width*height*{channels} = {expected}",
        )
    flat = np.frombuffer(data, np.uint8)
    return flat.reshape((height, width, 3) if channels == 3 else (height, width))


def raw_media_type(pixels: Pixels) -> str:
    """The raw media type matching the pixels' channel count."""
    return RAW_GRAY if channels_of(pixels) == 1 else RAW_RGB


def encoded_type(pixels: Pixels, media_type: str) -> str:
    """The exact media type `encode` makes of `media_type` for these pixels, without encoding."""
    if media_type == RAW_ANY:
        return raw_media_type(pixels)
    if media_type not in (RAW_RGB, RAW_GRAY) and media_type not in _EXTENSION:
        raise invalid_argument("OUTPUT_TYPE_UNSUPPORTED", f"output_media_type {media_type!r} is not supported")
    return media_type


def encode(pixels: Pixels, media_type: str, quality: int = 0) -> tuple[bytes, str]:
    """Pixels to bytes in `media_type` (raw or encoded); returns the bytes and the exact media type."""
    media_type = encoded_type(pixels, media_type)
    if media_type == RAW_RGB:
        rgb = pixels if channels_of(pixels) == 3 else cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
        return np.ascontiguousarray(rgb).tobytes(), RAW_RGB
    if media_type == RAW_GRAY:
        gray = pixels if channels_of(pixels) == 1 else cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
        return np.ascontiguousarray(gray).tobytes(), RAW_GRAY
    extension = _EXTENSION[media_type]
    quality = quality or DEFAULT_QUALITY
    params: list[int] = []
    if media_type == "image/jpeg":
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif media_type == "image/webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, quality]
    bgr = pixels if channels_of(pixels) == 1 else cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(extension, bgr, params)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise invalid_argument("ENCODE_FAILED", f"cannot encode image as {media_type}")
    return buffer.tobytes(), media_type


def to_rgb(pixels: Pixels) -> Pixels:
    """Three channels, converting gray if needed."""
    return pixels if channels_of(pixels) == 3 else cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)


def to_gray(pixels: Pixels) -> Pixels:
    """One channel, converting RGB if needed."""
    return pixels if channels_of(pixels) == 1 else cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
