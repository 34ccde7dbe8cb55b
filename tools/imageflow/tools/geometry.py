"""resize-grpc: resize, crop, rotate, flip, encode."""

from __future__ import annotations

import math

import cv2
import numpy as np
from imageflow.common.errors import invalid_argument
from imageflow.tools.imaging import channels_of
from imageflow.tools.spec import ToolInput, ToolOutput, ToolSpec, object_schema
from PIL import ImageColor

VERSION = "1.0.0"
SERVICE = "resize-grpc"

_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
    "area": cv2.INTER_AREA,
}
MAX_SIDE = 65535


def parse_color(value: str) -> tuple[int, int, int]:
    """A colour name or ``#rrggbb`` as RGB."""
    try:
        rgb = ImageColor.getrgb(value)
    except ValueError:
        raise invalid_argument("COLOR_INVALID", f"unknown colour {value!r}; use a name or #rrggbb") from None
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def target_size(width: int, height: int, params: dict[str, object]) -> tuple[int, int]:
    """Output size for resize params (exactly one of width/height, scale, max_side)."""
    keep_aspect = bool(params.get("keep_aspect", True))
    if "scale" in params:
        factor = float(params["scale"])  # type: ignore[arg-type]
        return max(1, round(width * factor)), max(1, round(height * factor))
    if "max_side" in params:
        factor = int(params["max_side"]) / max(width, height)  # type: ignore[call-overload]
        return max(1, round(width * factor)), max(1, round(height * factor))
    want_w = params.get("width")
    want_h = params.get("height")
    if want_w is not None and want_h is not None:
        if not keep_aspect:
            return int(want_w), int(want_h)  # type: ignore[call-overload]
        factor = min(int(want_w) / width, int(want_h) / height)  # type: ignore[call-overload]
        return max(1, round(width * factor)), max(1, round(height * factor))
    if want_w is not None:
        new_w = int(want_w)  # type: ignore[call-overload]
        return new_w, (max(1, round(height * new_w / width)) if keep_aspect else height)
    new_h = int(want_h)  # type: ignore[call-overload]
    return (max(1, round(width * new_h / height)) if keep_aspect else width), new_h


def _resize(inp: ToolInput) -> ToolOutput:
    height, width = inp.pixels.shape[:2]
    new_w, new_h = target_size(*(inp.source_size or (width, height)), inp.params)
    if new_w > MAX_SIDE or new_h > MAX_SIDE:
        raise invalid_argument("RESIZE_TOO_LARGE", f"resize to {new_w}x{new_h} exceeds {MAX_SIDE} pixels a side")
    if (new_w, new_h) == (width, height):
        return ToolOutput(pixels=inp.pixels)
    resized = cv2.resize(inp.pixels, (new_w, new_h), interpolation=_INTERPOLATION[inp.params["interpolation"]])
    return ToolOutput(pixels=resized)


def _resize_reduction(params: dict[str, object], width: int, height: int) -> int:
    """Shrink-on-load for an area downscale (what libvips and Pillow's draft do): the largest JPEG DCT scale (1/8,
    1/4, 1/2) that lands exactly on the target size, or leaves at least a 2x area shrink to finish with (a smaller
    remaining shrink would alias)."""
    if params.get("interpolation", "area") != "area":
        return 1
    new_w, new_h = target_size(width, height, params)
    for factor in (8, 4, 2):
        scaled_w, scaled_h = -(-width // factor), -(-height // factor)
        if (scaled_w, scaled_h) == (new_w, new_h) or (scaled_w >= 2 * new_w and scaled_h >= 2 * new_h):
            return factor
    return 1


def _crop(inp: ToolInput) -> ToolOutput:
    height, width = inp.pixels.shape[:2]
    box_w, box_h = int(inp.params["width"]), int(inp.params["height"])
    if inp.params["anchor"] == "center":
        x, y = (width - box_w) // 2, (height - box_h) // 2
    else:
        x, y = int(inp.params["x"]), int(inp.params["y"])
    left, top = max(0, x), max(0, y)
    right, bottom = min(width, x + box_w), min(height, y + box_h)
    if right <= left or bottom <= top:
        raise invalid_argument(
            "CROP_OUTSIDE_IMAGE", f"crop box ({x}, {y}, {box_w}x{box_h}) lies outside the {width}x{height} image"
        )
    return ToolOutput(pixels=np.ascontiguousarray(inp.pixels[top:bottom, left:right]))


def _rotated_size(params: dict[str, object], width: int, height: int) -> tuple[int, int]:
    """The output size: the input's, or with `expand` the bounding box of the rotated image."""
    if not params.get("expand", True):
        return width, height
    radians = math.radians(float(params["angle"]))  # type: ignore[arg-type]
    cos, sin = abs(math.cos(radians)), abs(math.sin(radians))
    return round(height * sin + width * cos), round(height * cos + width * sin)


def _resized_size(params: dict[str, object], width: int, height: int) -> tuple[int, int]:
    return target_size(width, height, params)


def _rotate(inp: ToolInput) -> ToolOutput:
    angle = float(inp.params["angle"]) % 360.0
    pixels = inp.pixels
    quarter = angle / 90.0
    if math.isclose(quarter, round(quarter), abs_tol=1e-9) and inp.params["expand"]:
        turns = round(quarter) % 4
        return ToolOutput(pixels=np.ascontiguousarray(np.rot90(pixels, k=turns)))
    height, width = pixels.shape[:2]
    center = (width / 2.0, height / 2.0)
    matrix = cv2.getRotationMatrix2D(center, angle, 1.0)
    out_w, out_h = width, height
    if inp.params["expand"]:
        out_w, out_h = _rotated_size(inp.params, width, height)
        matrix[0, 2] += out_w / 2.0 - center[0]
        matrix[1, 2] += out_h / 2.0 - center[1]
    fill = parse_color(str(inp.params["fill"]))
    border: tuple[int, ...] = fill if channels_of(pixels) == 3 else (round(sum(fill) / 3),)
    rotated = cv2.warpAffine(
        pixels, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=border
    )
    return ToolOutput(pixels=rotated)


def _flip(inp: ToolInput) -> ToolOutput:
    code = 1 if inp.params["direction"] == "horizontal" else 0
    return ToolOutput(pixels=cv2.flip(inp.pixels, code))


_ENCODE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def _encode(inp: ToolInput) -> ToolOutput:
    media_type = _ENCODE_TYPES[inp.params["format"]]
    quality = int(inp.params["quality"])
    return ToolOutput(
        pixels=None,
        encode_media_type=media_type,
        encode_quality=quality,
        metadata={"encode_media_type": media_type, "encode_quality": quality},
    )


def _positive_int(description: str) -> dict[str, object]:
    return {"type": "integer", "minimum": 1, "maximum": MAX_SIDE, "description": description}


RESIZE = ToolSpec(
    name="resize",
    phrases_ja=("リサイズ", "縮小", "拡大", "サイズ変更"),
    version=VERSION,
    description_ja="画像の大きさを変える（幅・高さ、倍率 scale、または長辺 max_side のどれか一つを指定。半分 = scale 0.5）",
    description_en="Resize by width and/or height, by scale factor, or so the longer side is max_side (exactly one).",
    params_schema=object_schema(
        {
            "width": _positive_int("output width in pixels"),
            "height": _positive_int("output height in pixels"),
            "scale": {"type": "number", "exclusiveMinimum": 0, "maximum": 16, "description": "factor; 0.5 = half"},
            "max_side": _positive_int("length of the longer side after resizing, in pixels"),
            "keep_aspect": {"type": "boolean", "default": True},
            "interpolation": {"enum": list(_INTERPOLATION), "default": "area"},
        },
        oneOf=[
            {"anyOf": [{"required": ["width"]}, {"required": ["height"]}]},
            {"required": ["scale"]},
            {"required": ["max_side"]},
        ],
    ),
    run=_resize,
    decode_reduction=_resize_reduction,
    output_size=_resized_size,
    keeps_luma=True,
)

CROP = ToolSpec(
    name="crop",
    phrases_ja=("切り抜き", "トリミング", "クロップ"),
    version=VERSION,
    description_ja="画像の一部を切り抜く（anchor=center で中央を切り抜き、x, y は無視）",
    description_en="Crop a width x height box at (x, y), or centred with anchor=center.",
    params_schema=object_schema(
        {
            "x": {"type": "integer", "minimum": 0, "default": 0},
            "y": {"type": "integer", "minimum": 0, "default": 0},
            "width": _positive_int("box width in pixels"),
            "height": _positive_int("box height in pixels"),
            "anchor": {"enum": ["top_left", "center"], "default": "top_left"},
        },
        required=["width", "height"],
    ),
    run=_crop,
    keeps_luma=True,
)

ROTATE = ToolSpec(
    name="rotate",
    phrases_ja=("回転", "傾け"),
    version=VERSION,
    description_ja="画像を回転する（角度は度、反時計回りが正。右に90度 = -90、左に90度 = 90）",
    description_en="Rotate by angle degrees, counter-clockwise positive (clockwise 90 = -90).",
    params_schema=object_schema(
        {
            "angle": {"type": "number", "minimum": -360, "maximum": 360, "description": "degrees, CCW positive"},
            "expand": {"type": "boolean", "default": True},
            "fill": {"type": "string", "default": "#000000", "maxLength": 32},
        },
        required=["angle"],
    ),
    run=_rotate,
    output_size=_rotated_size,
)

FLIP = ToolSpec(
    name="flip",
    phrases_ja=("反転", "ミラー"),
    version=VERSION,
    description_ja="画像を反転する（左右反転 = horizontal、上下反転 = vertical）",
    description_en="Mirror the image horizontally or vertically.",
    params_schema=object_schema({"direction": {"enum": ["horizontal", "vertical"]}}, required=["direction"]),
    run=_flip,
    keeps_luma=True,
)

ENCODE = ToolSpec(
    name="encode",
    phrases_ja=("形式変換", "書き出し"),
    version=VERSION,
    description_ja="出力の画像形式を決める（png / jpeg / webp、jpeg と webp は品質 1〜100）",
    description_en="Set the output encoding (png, jpeg or webp, with quality for jpeg/webp).",
    params_schema=object_schema(
        {
            "format": {"enum": list(_ENCODE_TYPES)},
            "quality": {"type": "integer", "minimum": 1, "maximum": 100, "default": 90},
        },
        required=["format"],
    ),
    run=_encode,
)

TOOLS: tuple[ToolSpec, ...] = (RESIZE, CROP, ROTATE, FLIP, ENCODE)
