"""One tool invocation end to end: decode, validate params, run, encode (pure, no grpc)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imageflow.common.errors import invalid_argument
from imageflow.common.media import RAW_ANY, RAW_GRAY, RAW_TYPES
from imageflow.common.params import JsonObject, normalize_numbers
from imageflow.common.pieces import Buffer
from imageflow.tools.imaging import DecodedImage, Pixels, encode, encoded_type, raw_media_type, to_gray, to_rgb
from imageflow.tools.spec import Detection, ToolInput, ToolSpec


@dataclass
class ProcessResult:
    """An encoded (or raw) output image with its facts; `pixels` instead of `data` when the caller keeps frames."""

    data: bytes
    media_type: str
    width: int
    height: int
    detections: list[Detection] = field(default_factory=list)
    metadata: JsonObject = field(default_factory=dict)
    pixels: Pixels | None = None


def output_type(requested: str, source: str, encode_override: str) -> str:
    """What to encode the output as: the request, else the encode tool's choice, else the input's format."""
    if encode_override and requested not in (RAW_ANY, *RAW_TYPES):
        return encode_override
    if requested:
        return requested
    if source in RAW_TYPES:
        return RAW_ANY
    return source


def reduction_for(spec: ToolSpec, checked: JsonObject) -> Callable[[int, int], int] | None:
    """The tool's shrink-on-load choice for these params, if it has one."""
    choose = spec.decode_reduction
    if choose is None:
        return None
    return lambda width, height: choose(checked, width, height)


def checked_params(spec: ToolSpec, params: Mapping[str, Any], output_quality: int) -> JsonObject:
    """The params validated against the tool's schema, defaults filled in (and the output quality checked)."""
    check_quality(output_quality)
    return spec.validated_params(normalize_numbers(spec.params_schema, params))


def check_quality(output_quality: int) -> None:
    """INVALID_ARGUMENT unless 0 (default) or 1-100."""
    if output_quality < 0 or output_quality > 100:
        raise invalid_argument("OUTPUT_QUALITY_INVALID", f"output_quality {output_quality} is outside 1-100")


def process_decoded(
    spec: ToolSpec,
    checked: JsonObject,
    image: DecodedImage,
    *,
    source_data: Buffer | None,
    detections: list[Detection],
    output_media_type: str,
    output_quality: int,
    keep_pixels: bool = False,
    omit_image: bool = False,
) -> ProcessResult:
    """Run `spec` on decoded pixels. With `keep_pixels`, a raw output stays an array (in-process callers) instead of
    bytes; `source_data` (the encoded input) is handed back untouched when the tool changed nothing. With
    `omit_image` (the caller reads no image from this step) the result has the output's type and size but no
    pixels: nothing is converted or encoded."""
    result = spec.run(
        ToolInput(pixels=image.pixels, params=checked, detections=detections, source_size=image.source_size)
    )
    pixels = image.pixels if result.pixels is None else result.pixels
    target = output_type(output_media_type, image.source_media_type, result.encode_media_type)
    quality = output_quality or result.encode_quality
    out_height, out_width = pixels.shape[:2]
    if omit_image:
        media_type = encoded_type(pixels, target)
        return ProcessResult(b"", media_type, out_width, out_height, result.detections, result.metadata)
    if target in RAW_TYPES:  # an exact raw type asked of a frame that stays in process: convert it here
        pixels = to_gray(pixels) if target == RAW_GRAY else to_rgb(pixels)
    if target in (RAW_ANY, *RAW_TYPES):
        target = raw_media_type(pixels)
        if keep_pixels:
            pixels.setflags(write=False)  # frames may be read by several steps: nobody writes in place
            return ProcessResult(b"", target, out_width, out_height, result.detections, result.metadata, pixels=pixels)
    if (
        source_data is not None
        and image.source_size is None
        and result.pixels is None
        and not result.encode_media_type
        and target == image.source_media_type
    ):
        encoded, final_type = bytes(source_data), target  # pass-through (a view of the request is copied once)
    else:
        encoded, final_type = encode(pixels, target, quality)
    return ProcessResult(
        data=encoded,
        media_type=final_type,
        width=out_width,
        height=out_height,
        detections=result.detections,
        metadata=result.metadata,
    )
