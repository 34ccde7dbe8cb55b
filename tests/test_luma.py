"""Luma-only decoding: an image headed only for tools that read gray (grayscale, threshold, edge_detect), through
tools that keep luma (resize, crop, flip), is decoded as gray alone (a JPEG's Y plane) and travels as raw gray."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from imageflow.common.media import RAW_ANY, RAW_GRAY
from imageflow.common.structs import dict_to_struct
from imageflow.server.adapters.storage import open_store
from imageflow.server.domain.compiler import compile_pipeline
from imageflow.server.domain.events import EventHub
from imageflow.server.domain.executor import ChainOutcome, Executor, ExecutorLimits, StepCallback, ToolResult
from imageflow.server.domain.frames import Frame, ImageHeader
from imageflow.server.domain.tool_records import RegisteredTool
from imageflow.tools import filters, geometry, plane
from imageflow.tools.imaging import ImageLimits, decode, to_gray
from imageflow.tools.plane import ChainStepSpec, ToolPlane, luma_only
from imageflow.tools.servicer import tool_message
from imageflow.v1 import execution_pb2, image_pb2, pipeline_pb2, tool_service_pb2
from PIL import Image as PILImage

from tests.conftest import exif_rotated_jpeg, psnr, sample

SPECS = {spec.name: spec for spec in (*geometry.TOOLS, *filters.TOOLS)}
LIMITS = ImageLimits()


@pytest.mark.parametrize(
    ("tools", "output", "expected"),
    [
        (["grayscale"], "image/jpeg", True),
        (["resize", "grayscale", "blur"], "image/jpeg", True),
        (["crop", "flip", "threshold"], "image/png", True),
        (["resize", "edge_detect"], RAW_ANY, True),
        (["resize", "blur", "grayscale"], "image/jpeg", False),  # blur sees colour first
        (["rotate", "grayscale"], "image/jpeg", False),  # rotate's fill colour is not converted like the image
        (["resize"], RAW_ANY, False),
        (["resize"], "image/jpeg", False),
        (["resize", "flip"], RAW_GRAY, True),  # the caller asked for gray: what comes next reads luma only
        (["adjust"], RAW_GRAY, False),
    ],
)  # fmt: skip
def test_a_chain_decodes_luma_only_when_nothing_needs_colour(tools: list[str], output: str, expected: bool) -> None:
    assert luma_only([SPECS[name] for name in tools], output) is expected


@pytest.mark.parametrize("name", ["astronaut.jpg", "coffee.jpg", "chelsea.jpg"])
@pytest.mark.parametrize("factor", [1, 2])
def test_a_jpeg_decoded_as_luma_is_its_gray_up_to_rounding(name: str, factor: int) -> None:
    data = sample(name)
    reduction = (lambda w, h: factor) if factor > 1 else None
    luma = decode(data, "", 0, 0, LIMITS, reduction, luma=True)
    colour = decode(data, "", 0, 0, LIMITS, reduction)
    assert luma.pixels.ndim == 2 and luma.pixels.shape == colour.pixels.shape[:2]
    assert luma.source_media_type == "image/jpeg" and luma.source_size == colour.source_size
    gray = to_gray(colour.pixels)
    # the Y plane is what the RGB pixels were made from: they differ only where RGB was rounded or clipped
    assert psnr(luma.pixels, gray) >= 55
    assert float(np.mean(luma.pixels == gray)) >= 0.97


def test_other_inputs_are_converted_to_gray_right_after_decoding() -> None:
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(sample("coffee.jpg"), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="PNG")
    luma = decode(buffer.getvalue(), "image/png", 0, 0, LIMITS, luma=True)
    assert np.array_equal(luma.pixels, to_gray(rgb))
    raw = decode(rgb.tobytes(), "image/x-raw-rgb8", rgb.shape[1], rgb.shape[0], LIMITS, luma=True)
    assert np.array_equal(raw.pixels, to_gray(rgb))


def _run(steps: list[tuple[str, dict[str, Any]]], data: bytes, output: str) -> tuple[np.ndarray, list[bool]]:
    """Runs a chain on a plane serving every reference tool; returns the output and the luma flag of each decode."""
    seen: list[bool] = []
    real = plane.decode

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(bool(kwargs.get("luma")))
        return real(*args, **kwargs)

    tool_plane = ToolPlane("all", tuple(SPECS.values()), LIMITS, workers=1)
    try:
        plane.decode = spy  # type: ignore[assignment]
        result = asyncio.run(
            tool_plane.run_chain([ChainStepSpec(t, p) for t, p in steps], data=data, output_media_type=output)
        )
    finally:
        plane.decode = real  # type: ignore[assignment]
        tool_plane.close()
    assert result.failure is None
    last = result.done[-1].result
    pixels = np.frombuffer(last.data, np.uint8)
    return pixels.reshape(last.height, last.width, -1).squeeze(), seen


def test_resize_then_grayscale_decodes_luma_with_nearly_the_same_pixels() -> None:
    data = sample("astronaut.jpg")
    fused, flags = _run([("resize", {"scale": 0.5}), ("grayscale", {})], data, RAW_ANY)
    assert flags == [True]
    colour, flags = _run([("resize", {"scale": 0.5})], data, "image/x-raw-rgb8")
    assert flags == [False]
    assert fused.shape == colour.shape[:2]
    assert psnr(fused, to_gray(colour)) >= 55


def test_a_colour_chain_still_decodes_colour() -> None:
    _, flags = _run([("resize", {"scale": 0.5}), ("blur", {}), ("grayscale", {})], sample("astronaut.jpg"), RAW_ANY)
    assert flags == [False]


def manifest(name: str, address: str = "fake:1") -> RegisteredTool:
    tool = tool_message(SPECS[name])
    tool.address = address
    return RegisteredTool.of(tool)


PARAMS: dict[str, dict[str, Any]] = {
    "resize": {"scale": 0.5},
    "flip": {"direction": "vertical"},
    "crop": {"width": 10, "height": 10},
    "rotate": {"angle": 90},
}


def pipeline(steps: list[tuple[str, str, list[str]]], outputs: Sequence[str] = ()) -> pipeline_pb2.Pipeline:
    result = pipeline_pb2.Pipeline(name="luma", outputs=list(outputs))
    for step_id, tool, deps in steps:
        params = PARAMS.get(tool, {})
        result.steps.add(id=step_id, tool=tool, depends_on=deps, params=dict_to_struct(params))
    return result


def test_the_manifest_says_which_tools_read_and_keep_luma() -> None:
    assert {name for name, spec in SPECS.items() if tool_message(spec).reads_luma} == {
        "grayscale",
        "threshold",
        "edge_detect",
    }
    assert {name for name, spec in SPECS.items() if tool_message(spec).keeps_luma} == {"resize", "crop", "flip"}


@pytest.mark.parametrize(
    ("steps", "outputs", "luma"),
    [
        ([("a", "resize", []), ("g", "grayscale", ["a"])], (), {"a"}),
        ([("a", "resize", []), ("g", "grayscale", ["a"]), ("t", "threshold", ["a"])], (), {"a"}),
        ([("a", "resize", []), ("g", "grayscale", ["a"]), ("b", "blur", ["a"])], (), set()),  # blur needs colour
        ([("a", "resize", []), ("g", "grayscale", ["a"])], ("a", "g"), set()),  # an output keeps its colour
        ([("a", "resize", []), ("b", "blur", ["a"]), ("g", "grayscale", ["b"])], (), {"b"}),
        ([("g", "grayscale", [])], (), set()),
        # through tools that keep luma, as a tool service looks through a chain
        ([("a", "crop", []), ("f", "flip", ["a"]), ("e", "edge_detect", ["f"])], (), {"a", "f"}),
        ([("a", "crop", []), ("f", "flip", ["a"]), ("e", "edge_detect", ["f"])], ("f", "e"), set()),
        ([("a", "crop", []), ("r", "rotate", ["a"]), ("g", "grayscale", ["r"])], (), {"r"}),
        ([("a", "crop", []), ("f", "flip", ["a"]), ("g", "grayscale", ["f"]), ("b", "blur", ["a"])], (), {"f"}),
    ],
)  # fmt: skip
def test_the_compiler_marks_steps_whose_image_goes_only_to_luma_readers(
    steps: list[tuple[str, str, list[str]]], outputs: tuple[str, ...], luma: set[str]
) -> None:
    tools = {name: manifest(name) for name in SPECS}
    assert compile_pipeline(pipeline(steps, outputs), tools, chains=False).luma_steps == luma


class RecordingInvoker:
    """Answers every step with a 2×2 raw frame in the channel count asked for; records what each request asked."""

    def __init__(self) -> None:
        self.asked: dict[str, str] = {}

    def keeps_frames(self, address: str) -> bool:
        return False

    async def process(
        self, address: str, request: tool_service_pb2.ProcessRequest, image: Frame, timeout_s: float
    ) -> ToolResult:
        self.asked[request.tool] = request.output_media_type
        gray = request.output_media_type == RAW_GRAY
        media_type = RAW_GRAY if gray else "image/x-raw-rgb8"
        out = image_pb2.Image(data=bytes(4 if gray else 12), media_type=media_type, width=2, height=2)
        return ToolResult(out.SerializeToString(), ImageHeader(media_type, 2, 2))

    async def process_chain(self, address: str, requests: Sequence[tool_service_pb2.ProcessRequest], image: Frame,
                            timeout_s: float, on_step: StepCallback,
                            addresses: Sequence[str] | None = None) -> ChainOutcome:  # fmt: skip
        raise AssertionError("steps on different addresses are not chained")


@pytest.mark.parametrize(
    ("raw_max_pixels", "resize_gets"),
    [(16_000_000, RAW_GRAY), (2, RAW_GRAY), (1, "image/png")],  # the 2x2 input: 4 pixels, a third of RGB's bytes
)
async def test_the_executor_asks_for_raw_gray_where_only_luma_is_read(
    tmp_path: Path, raw_max_pixels: int, resize_gets: str
) -> None:
    """Over IMAGEFLOW_RAW_INTERMEDIATE_MAX_PIXELS frames travel as PNG; a gray frame is a third of the bytes, so the
    bound for it is three times the pixels."""
    store = await open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    invoker = RecordingInvoker()
    hub = EventHub(store, [])
    limits = ExecutorLimits(raw_intermediate_max_pixels=raw_max_pixels)
    executor = Executor(store, hub, invoker, lambda address: True, limits)  # type: ignore[arg-type]
    tools = {
        "resize": manifest("resize", address="resize:1"),
        "grayscale": manifest("grayscale", address="filter:1"),
        "flip": manifest("flip", address="flip:1"),
    }
    compiled = compile_pipeline(pipeline([("a", "resize", []), ("g", "grayscale", ["a"]), ("f", "flip", ["g"])]), tools)
    source = image_pb2.Image(data=bytes(12), media_type="image/x-raw-rgb8", width=2, height=2)
    execution_id, _ = await executor.start(compiled, {"image": source})
    events = [e async for e in hub.watch(execution_id, 0)]
    await store.close()
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
    assert invoker.asked["resize"] == resize_gets
    assert invoker.asked["flip"] == "image/x-raw-rgb8"  # the output, in the input's own kind


def test_an_exif_rotated_jpeg_decoded_as_luma_is_upright_like_its_colour() -> None:
    rotated = exif_rotated_jpeg()
    luma = decode(rotated, "", 0, 0, LIMITS, luma=True)
    colour = decode(rotated, "", 0, 0, LIMITS)
    assert luma.pixels.shape == colour.pixels.shape[:2] == (451, 300)
    assert psnr(luma.pixels, to_gray(colour.pixels)) >= 55


def test_the_luma_of_a_saturated_jpeg_differs_only_where_colour_was_clipped() -> None:
    """Saturated blocks with sharp edges: decoding in colour clips R, G or B at 0 or 255 (up to 26 levels off in gray
    here); the Y plane is what those values were made from. Wherever nothing was clipped, the two agree."""
    rng = np.random.default_rng(0)
    blocks = rng.choice([0, 255], size=(32, 32, 3)).astype(np.uint8)
    image = np.kron(blocks, np.ones((8, 8, 1), np.uint8))
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    luma = decode(encoded.tobytes(), "image/jpeg", 0, 0, LIMITS, luma=True).pixels.astype(int)
    colour = decode(encoded.tobytes(), "image/jpeg", 0, 0, LIMITS).pixels
    difference = np.abs(luma - to_gray(colour).astype(int))
    clipped = ((colour == 0) | (colour == 255)).any(axis=2)
    assert difference.max() > 2  # the clipped pixels do differ
    assert difference[~clipped].max() <= 1
