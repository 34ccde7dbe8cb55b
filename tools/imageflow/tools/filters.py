"""filter-grpc: grayscale, blur, sharpen, adjust, threshold, edge_detect, draw_boxes, blur_regions."""

from __future__ import annotations

import cv2
import numpy as np
from imageflow.tools.geometry import parse_color
from imageflow.tools.imaging import Pixels, channels_of, to_gray
from imageflow.tools.spec import (
    DETECTIONS_IN,
    IMAGE_IN,
    Detection,
    ToolInput,
    ToolOutput,
    ToolSpec,
    object_schema,
)

VERSION = "1.0.0"
SERVICE = "filter-grpc"


def _odd_kernel(radius: float) -> int:
    return max(1, 2 * round(radius) + 1)


def _grayscale(inp: ToolInput) -> ToolOutput:
    return ToolOutput(pixels=to_gray(inp.pixels))


def blur_pixels(pixels: Pixels, method: str, radius: float) -> Pixels:
    """Gaussian (sigma = radius), median or box blur."""
    if radius <= 0:
        return pixels
    if method == "median":
        return cv2.medianBlur(np.ascontiguousarray(pixels), min(_odd_kernel(radius), 255))
    if method == "box":
        size = _odd_kernel(radius)
        return cv2.blur(pixels, (size, size))
    return cv2.GaussianBlur(pixels, (0, 0), sigmaX=radius, sigmaY=radius)


def _blur(inp: ToolInput) -> ToolOutput:
    return ToolOutput(pixels=blur_pixels(inp.pixels, inp.params["method"], float(inp.params["radius"])))


def _sharpen(inp: ToolInput) -> ToolOutput:
    amount = float(inp.params["amount"])
    blurred = cv2.GaussianBlur(inp.pixels, (0, 0), sigmaX=1.0)
    return ToolOutput(pixels=cv2.addWeighted(inp.pixels, 1.0 + amount, blurred, -amount, 0))


def _adjust(inp: ToolInput) -> ToolOutput:
    pixels = inp.pixels.astype(np.float32)
    brightness = float(inp.params["brightness"])
    contrast = float(inp.params["contrast"])
    saturation = float(inp.params["saturation"])
    if brightness != 1.0:
        pixels *= brightness
    if contrast != 1.0:
        mean = float(to_gray(np.clip(pixels, 0, 255).astype(np.uint8)).mean())
        pixels = (pixels - mean) * contrast + mean
    if saturation != 1.0 and channels_of(inp.pixels) == 3:
        gray = cv2.cvtColor(np.clip(pixels, 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY).astype(np.float32)
        pixels = (pixels - gray[..., None]) * saturation + gray[..., None]
    return ToolOutput(pixels=np.clip(pixels, 0, 255).astype(np.uint8))


def _threshold(inp: ToolInput) -> ToolOutput:
    gray = to_gray(inp.pixels)
    if inp.params["method"] == "otsu":
        value, binary = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    else:
        value, binary = cv2.threshold(gray, int(inp.params["value"]), 255, cv2.THRESH_BINARY)
    return ToolOutput(pixels=binary, metadata={"threshold": float(value)})


def _edge_detect(inp: ToolInput) -> ToolOutput:
    return ToolOutput(pixels=cv2.Canny(to_gray(inp.pixels), int(inp.params["low"]), int(inp.params["high"])))


def _clip_box(det: Detection, width: int, height: int) -> tuple[int, int, int, int] | None:
    left = max(0, round(det.box.x))
    top = max(0, round(det.box.y))
    right = min(width, round(det.box.x + det.box.width))
    bottom = min(height, round(det.box.y + det.box.height))
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


def _draw_boxes(inp: ToolInput) -> ToolOutput:
    pixels = inp.pixels.copy()
    height, width = pixels.shape[:2]
    rgb = parse_color(str(inp.params["color"]))
    color: tuple[int, ...] = rgb if channels_of(pixels) == 3 else (round(sum(rgb) / 3),)
    thickness = int(inp.params["thickness"])
    drawn = 0
    for det in inp.detections:
        box = _clip_box(det, width, height)
        if box is None:
            continue
        left, top, right, bottom = box
        cv2.rectangle(pixels, (left, top), (right - 1, bottom - 1), color, thickness)
        if inp.params["show_labels"]:
            text = f"{det.label} {det.score:.2f}"
            cv2.putText(
                pixels, text, (left + 2, max(12, top - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, 1, cv2.LINE_AA
            )
        drawn += 1
    return ToolOutput(pixels=pixels, metadata={"boxes_drawn": drawn})


def _obscure(pixels: Pixels, params: dict[str, object]) -> Pixels:
    """The whole of `pixels` blurred (gaussian) or pixelated, as blur_regions' params ask."""
    height, width = pixels.shape[:2]
    if params["method"] == "pixelate":
        block = int(params["block"])  # type: ignore[call-overload]
        small = cv2.resize(pixels, (max(1, width // block), max(1, height // block)), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)
    return blur_pixels(pixels, "gaussian", float(params["radius"]))  # type: ignore[arg-type]


def _blur_regions(inp: ToolInput) -> ToolOutput:
    height, width = inp.pixels.shape[:2]
    boxes = [box for det in inp.detections if (box := _clip_box(det, width, height)) is not None]
    if inp.params["area"] == "outside":
        # everything but the regions: obscure the whole frame, then put the regions back sharp
        pixels = _obscure(inp.pixels, inp.params)
        if pixels is inp.pixels or not pixels.flags.writeable:  # radius 0 hands the input back; it may be read-only
            pixels = pixels.copy()
        for left, top, right, bottom in boxes:
            pixels[top:bottom, left:right] = inp.pixels[top:bottom, left:right]
        return ToolOutput(pixels=pixels, metadata={"regions_kept": len(boxes), "area": "outside"})
    pixels = inp.pixels.copy()
    for left, top, right, bottom in boxes:
        pixels[top:bottom, left:right] = _obscure(pixels[top:bottom, left:right], inp.params)
    return ToolOutput(pixels=pixels, metadata={"regions_blurred": len(boxes)})


GRAYSCALE = ToolSpec(
    name="grayscale",
    phrases_ja=("グレースケール", "白黒", "モノクロ"),
    version=VERSION,
    description_ja="グレースケール（白黒）に変換する",
    description_en="Convert to grayscale.",
    params_schema=object_schema({}),
    run=_grayscale,
    reads_luma=True,
)

BLUR = ToolSpec(
    name="blur",
    phrases_ja=("ぼかし", "ブラー", "ノイズ除去"),
    version=VERSION,
    description_ja="画像全体をぼかす（gaussian / median / box、半径はピクセル。メディアン = ノイズ除去）",
    description_en="Blur the whole image (gaussian, median or box; radius in pixels).",
    params_schema=object_schema(
        {
            "method": {"enum": ["gaussian", "median", "box"], "default": "gaussian"},
            "radius": {"type": "number", "minimum": 0, "maximum": 100, "default": 2},
        }
    ),
    run=_blur,
)

SHARPEN = ToolSpec(
    name="sharpen",
    phrases_ja=("シャープ", "鮮明"),
    version=VERSION,
    description_ja="画像をシャープにする（amount で強さ）",
    description_en="Sharpen with an unsharp mask of the given amount.",
    params_schema=object_schema({"amount": {"type": "number", "minimum": 0, "maximum": 10, "default": 1.0}}),
    run=_sharpen,
)

ADJUST = ToolSpec(
    name="adjust",
    phrases_ja=("明るさ", "コントラスト", "彩度"),
    version=VERSION,
    description_ja="明るさ・コントラスト・彩度を倍率で調整する（1.0 = そのまま）",
    description_en="Scale brightness, contrast and saturation (1.0 = unchanged).",
    params_schema=object_schema(
        {
            "brightness": {"type": "number", "minimum": 0, "maximum": 10, "default": 1.0},
            "contrast": {"type": "number", "minimum": 0, "maximum": 10, "default": 1.0},
            "saturation": {"type": "number", "minimum": 0, "maximum": 10, "default": 1.0},
        }
    ),
    run=_adjust,
)

THRESHOLD = ToolSpec(
    name="threshold",
    phrases_ja=("二値化", "2値化"),
    version=VERSION,
    description_ja="二値化する（fixed はしきい値 value、otsu は大津の方法で自動）",
    description_en="Binarise with a fixed value or Otsu's method.",
    params_schema=object_schema(
        {
            "method": {"enum": ["fixed", "otsu"], "default": "fixed"},
            "value": {"type": "integer", "minimum": 0, "maximum": 255, "default": 128},
        }
    ),
    run=_threshold,
    reads_luma=True,
)

EDGE_DETECT = ToolSpec(
    name="edge_detect",
    phrases_ja=("エッジ検出", "輪郭抽出"),
    version=VERSION,
    description_ja="エッジ（輪郭）を検出する（Canny、low / high はしきい値）",
    description_en="Canny edge detection (converts to gray itself).",
    params_schema=object_schema(
        {
            "low": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 100},
            "high": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 200},
        }
    ),
    run=_edge_detect,
    reads_luma=True,
)

DRAW_BOXES = ToolSpec(
    name="draw_boxes",
    phrases_ja=("枠", "囲む"),
    version=VERSION,
    description_ja="検出結果を枠で描画する（color は色名か #rrggbb、thickness は線の太さ）",
    description_en="Draw detection boxes (and labels) on the image.",
    params_schema=object_schema(
        {
            "color": {"type": "string", "default": "red", "maxLength": 32},
            "thickness": {"type": "integer", "minimum": 1, "maximum": 50, "default": 2},
            "show_labels": {"type": "boolean", "default": True},
        }
    ),
    run=_draw_boxes,
    inputs=(IMAGE_IN, DETECTIONS_IN),
)

BLUR_REGIONS = ToolSpec(
    name="blur_regions",
    phrases_ja=("モザイク", "部分ぼかし"),
    version=VERSION,
    description_ja="検出した領域をぼかす（gaussian、またはモザイク = pixelate）。area: outside で領域以外（背景）をぼかす",
    description_en="Blur (or pixelate) the detected regions, or with area outside everything except them.",
    params_schema=object_schema(
        {
            "method": {"enum": ["gaussian", "pixelate"], "default": "gaussian"},
            "radius": {"type": "number", "minimum": 0, "maximum": 200, "default": 12},
            "block": {"type": "integer", "minimum": 2, "maximum": 512, "default": 16},
            "area": {
                "enum": ["inside", "outside"],
                "default": "inside",
                "description": "inside: the regions; outside: everything except the regions (背景をぼかす)",
            },
        }
    ),
    run=_blur_regions,
    inputs=(IMAGE_IN, DETECTIONS_IN),
)

TOOLS: tuple[ToolSpec, ...] = (
    GRAYSCALE,
    BLUR,
    SHARPEN,
    ADJUST,
    THRESHOLD,
    EDGE_DETECT,
    DRAW_BOXES,
    BLUR_REGIONS,
)
