"""JPEG shrink-on-load in resize: an area downscale decodes the JPEG at 1/2, 1/4 or 1/8 first, giving the same size
and nearly the same pixels as a full decode, and nothing changes where it must not apply."""

from __future__ import annotations

import asyncio
import io

import cv2
import numpy as np
import pytest
from imageflow.tools.catalog import catalog
from imageflow.tools.imaging import ImageLimits, decode
from imageflow.tools.plane import ToolPlane
from PIL import Image as PILImage

from tests.conftest import exif_rotated_jpeg, psnr, sample

RESIZE = next(spec for spec in catalog("resize").tools if spec.name == "resize")
PLANE = ToolPlane("resize-grpc", (RESIZE,), ImageLimits(), workers=1)


def run(data: bytes, params: dict[str, object]) -> np.ndarray:
    result = asyncio.run(PLANE.run("resize", params, data=data, output_media_type="image/x-raw"))
    channels = 3 if result.media_type.endswith("rgb8") else 1
    return np.frombuffer(result.data, np.uint8).reshape(result.height, result.width, channels)


def full_decode_area(data: bytes, size: tuple[int, int]) -> np.ndarray:
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize(
    ("params", "size", "factor"),
    [({"scale": 0.5}, (256, 256), 2), ({"scale": 0.25}, (128, 128), 4), ({"width": 64}, (64, 64), 8),
     ({"scale": 0.2}, (102, 102), 2), ({"width": 60}, (60, 60), 4), ({"max_side": 300}, (300, 300), 1)],
)  # fmt: skip
@pytest.mark.parametrize("name", ["astronaut.jpg", "coffee.jpg"])
def test_area_downscale_decodes_smaller_with_the_same_size_and_the_same_quality(
    params: dict[str, object], size: tuple[int, int], factor: int, name: str
) -> None:
    data = sample(name)
    width, height = PILImage.open(io.BytesIO(data)).size
    checked = RESIZE.validated_params(params)
    assert RESIZE.decode_reduction is not None
    if name == "astronaut.jpg":  # 512x512
        assert RESIZE.decode_reduction(checked, width, height) == factor
    out = run(data, params)
    want = (round(width * size[0] / 512), round(height * size[0] / 512)) if "scale" in params else None
    if name == "astronaut.jpg":
        assert out.shape[:2] == (size[1], size[0])
    elif want is not None:
        assert out.shape[:2] == (want[1], want[0])
    target = (out.shape[1], out.shape[0])
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    truth = np.asarray(PILImage.fromarray(rgb).resize(target, PILImage.Resampling.LANCZOS))
    # against a Lanczos reference, within 1.5 dB of decoding in full and area-resizing
    assert psnr(out, truth) >= psnr(full_decode_area(data, target), truth) - 1.5


def test_other_interpolations_decode_in_full() -> None:
    data = sample("astronaut.jpg")
    out = run(data, {"scale": 0.5, "interpolation": "bicubic"})
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(out, cv2.resize(rgb, (256, 256), interpolation=cv2.INTER_CUBIC))


def test_exif_rotated_jpeg_is_decoded_in_full_and_upright() -> None:
    out = run(exif_rotated_jpeg(), {"scale": 0.5})
    assert out.shape[:2] == (226, 150)  # the displayed (rotated) image, halved


def test_decode_reports_the_encoded_size_when_it_shrinks() -> None:
    decoded = decode(sample("astronaut.jpg"), "", 0, 0, ImageLimits(), lambda w, h: 4)
    assert decoded.pixels.shape[:2] == (128, 128) and decoded.source_size == (512, 512)


def test_upscale_and_non_jpeg_are_untouched() -> None:
    png = cv2.imencode(".png", cv2.imdecode(np.frombuffer(sample("coffee.jpg"), np.uint8), cv2.IMREAD_COLOR))[1].tobytes()
    assert decode(png, "", 0, 0, ImageLimits(), lambda w, h: 8).source_size is None
    assert RESIZE.decode_reduction is not None
    assert RESIZE.decode_reduction(RESIZE.validated_params({"scale": 1.5}), 600, 400) == 1
