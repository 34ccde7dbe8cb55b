"""Reference tool services over real gRPC: pixels, schemas, detections, bad input."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imageflow.common.structs import dict_to_struct
from imageflow.testing.local import free_port, wait_serving
from imageflow.tools.imaging import ImageLimits
from imageflow.tools.server import start_tool_server
from imageflow.v1 import image_pb2, tool_service_pb2, tool_service_pb2_grpc
from PIL import Image as PILImage

from tests.conftest import aio_channel, sample

Stub = tool_service_pb2_grpc.ToolServiceStub


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tools() -> AsyncIterator[dict[str, Stub]]:
    """The three services on free ports, with a small pixel limit for the limit tests."""
    limits = ImageLimits(max_pixels=40_000_000, max_encoded_bytes=8 * 1024 * 1024)
    servers = [await start_tool_server(kind, limits=limits) for kind in ("resize", "filter", "detection")]
    channels = [aio_channel(s.address) for s in servers]
    stubs = {s.kind: Stub(c) for s, c in zip(servers, channels, strict=True)}
    yield stubs
    for chan in channels:
        await chan.close()
    for server in servers:
        await server.stop(0.1)


def to_array(image: image_pb2.Image) -> np.ndarray:
    """Decode a response image (raw or encoded)."""
    if image.media_type == "image/x-raw-rgb8":
        return np.frombuffer(image.data, np.uint8).reshape(image.height, image.width, 3)
    if image.media_type == "image/x-raw-gray8":
        return np.frombuffer(image.data, np.uint8).reshape(image.height, image.width)
    return np.asarray(PILImage.open(io.BytesIO(image.data)))


async def call(stub: Stub, tool: str, params: dict | None = None, data: bytes | None = None, **kw):  # type: ignore[no-untyped-def]
    image = kw.pop("image", None) or image_pb2.Image(data=data if data is not None else sample("astronaut.jpg"))
    return await stub.Process(
        tool_service_pb2.ProcessRequest(tool=tool, params=dict_to_struct(params or {}), image=image, **kw)
    )


async def test_describe_lists_all_fourteen_tools(tools: dict[str, Stub]) -> None:
    names = set()
    for stub in tools.values():
        reply = await stub.Describe(tool_service_pb2.DescribeRequest())
        for tool in reply.tools:
            assert tool.description_ja and tool.description_en and tool.version
            assert tool.params_schema.fields["type"].string_value == "object"
            names.add(tool.name)
    assert names == {
        "resize", "crop", "rotate", "flip", "encode", "grayscale", "blur", "sharpen", "adjust", "threshold",
        "edge_detect", "draw_boxes", "blur_regions", "detect",
    }  # fmt: skip
    resize = next(
        t for t in (await tools["resize"].Describe(tool_service_pb2.DescribeRequest())).tools if t.name == "resize"
    )
    assert "oneOf" in resize.params_schema.fields


@pytest.mark.parametrize(
    ("params", "size"),
    [({"scale": 0.5}, (256, 256)), ({"width": 128}, (128, 128)), ({"max_side": 100}, (100, 100)),
     ({"width": 300, "height": 100, "keep_aspect": False}, (300, 100))],
)  # fmt: skip
async def test_resize_sizes(tools: dict[str, Stub], params: dict, size: tuple[int, int]) -> None:  # type: ignore[type-arg]
    reply = await call(tools["resize"], "resize", params)
    assert (reply.image.width, reply.image.height) == size
    assert reply.image.media_type == "image/jpeg"
    assert to_array(reply.image).shape[:2] == (size[1], size[0])


async def test_rotate_sign_convention(tools: dict[str, Stub]) -> None:
    # A 2x1 image: left pixel red, right pixel blue. Clockwise 90 (angle -90) puts red on top.
    raw = np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)
    image = image_pb2.Image(data=raw.tobytes(), media_type="image/x-raw-rgb8", width=2, height=1)
    clockwise = to_array((await call(tools["resize"], "rotate", {"angle": -90}, image=image)).image)
    assert clockwise.shape == (2, 1, 3)
    assert tuple(clockwise[0, 0]) == (255, 0, 0)
    counter = to_array((await call(tools["resize"], "rotate", {"angle": 90}, image=image)).image)
    assert tuple(counter[0, 0]) == (0, 0, 255)


async def test_crop_center_and_flip(tools: dict[str, Stub]) -> None:
    reply = await call(
        tools["resize"], "crop", {"width": 100, "height": 50, "anchor": "center"}, output_media_type="image/png"
    )
    assert (reply.image.width, reply.image.height, reply.image.media_type) == (100, 50, "image/png")
    raw = np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)
    image = image_pb2.Image(data=raw.tobytes(), media_type="image/x-raw-rgb8", width=2, height=1)
    flipped = to_array((await call(tools["resize"], "flip", {"direction": "horizontal"}, image=image)).image)
    assert tuple(flipped[0, 0]) == (4, 5, 6)


async def test_encode_sets_format_and_quality(tools: dict[str, Stub]) -> None:
    low = await call(tools["resize"], "encode", {"format": "jpeg", "quality": 20})
    high = await call(tools["resize"], "encode", {"format": "jpeg", "quality": 95})
    webp = await call(tools["resize"], "encode", {"format": "webp"})
    assert low.image.media_type == high.image.media_type == "image/jpeg"
    assert len(low.image.data) < len(high.image.data)
    assert webp.image.data[8:12] == b"WEBP"


async def test_grayscale_is_gray_and_threshold_binary(tools: dict[str, Stub]) -> None:
    gray = await call(tools["filter"], "grayscale", output_media_type="image/x-raw")
    assert gray.image.media_type == "image/x-raw-gray8"
    assert len(gray.image.data) == 512 * 512
    png = to_array((await call(tools["filter"], "grayscale", output_media_type="image/png")).image)
    assert png.ndim == 2
    binary = to_array(
        (await call(tools["filter"], "threshold", {"method": "otsu"}, output_media_type="image/png")).image
    )
    assert set(np.unique(binary)) <= {0, 255}
    assert len(np.unique(binary)) == 2


async def test_filters_change_pixels(tools: dict[str, Stub]) -> None:
    original = to_array((await call(tools["filter"], "adjust", {}, output_media_type="image/png")).image).astype(int)
    brighter = to_array(
        (await call(tools["filter"], "adjust", {"brightness": 1.5}, output_media_type="image/png")).image
    )
    assert brighter.astype(int).mean() > original.mean() + 10
    blurred = to_array((await call(tools["filter"], "blur", {"radius": 5}, output_media_type="image/png")).image)
    assert np.abs(np.diff(blurred.astype(int), axis=1)).mean() < np.abs(np.diff(original, axis=1)).mean()
    edges = to_array((await call(tools["filter"], "edge_detect", output_media_type="image/png")).image)
    assert edges.ndim == 2 and 0 < (edges > 0).mean() < 0.5


async def test_detects_person_and_face_on_astronaut(tools: dict[str, Stub]) -> None:
    reply = await call(tools["detection"], "detect", {"classes": ["person", "face"]})
    labels = {d.label for d in reply.detections}
    assert labels == {"person", "face"}
    face = next(d for d in reply.detections if d.label == "face")
    # The face sits in the upper middle of the 512x512 portrait.
    assert 120 < face.box.x + face.box.width / 2 < 320
    assert 40 < face.box.y + face.box.height / 2 < 220
    assert reply.image.data == sample("astronaut.jpg")  # pass-through, untouched


async def test_detects_cat_on_chelsea(tools: dict[str, Stub]) -> None:
    reply = await call(tools["detection"], "detect", {"classes": ["cat"]}, data=sample("chelsea.jpg"))
    assert [d.label for d in reply.detections] == ["cat"]
    assert reply.detections[0].score >= 0.5


async def test_draw_boxes_and_blur_regions_use_detections(tools: dict[str, Stub]) -> None:
    box = image_pb2.Detection(label="face", score=0.9, box=image_pb2.BoundingBox(x=180, y=80, width=90, height=90))
    original = to_array((await call(tools["filter"], "adjust", {}, output_media_type="image/png")).image).astype(int)
    drawn = to_array(
        (
            await call(
                tools["filter"], "draw_boxes", {"color": "#00ff00"}, detections=[box], output_media_type="image/png"
            )
        ).image
    )
    assert tuple(drawn[80, 200]) == (0, 255, 0)
    mosaic = to_array(
        (
            await call(
                tools["filter"], "blur_regions", {"method": "pixelate"}, detections=[box], output_media_type="image/png"
            )
        ).image
    ).astype(int)
    assert not np.array_equal(mosaic[80:170, 180:270], original[80:170, 180:270])
    assert np.array_equal(mosaic[300:, 300:], original[300:, 300:])


@pytest.mark.parametrize("method", ["gaussian", "pixelate"])
async def test_blur_regions_outside_blurs_the_background_and_keeps_the_regions_sharp(
    tools: dict[str, Stub], method: str
) -> None:
    box = image_pb2.Detection(label="person", score=0.9, box=image_pb2.BoundingBox(x=180, y=80, width=90, height=90))
    original = to_array((await call(tools["filter"], "adjust", {}, output_media_type="image/png")).image).astype(int)

    async def blurred(area: str) -> np.ndarray:
        params = {"method": method, "area": area}
        reply = await call(tools["filter"], "blur_regions", params, detections=[box], output_media_type="image/png")
        return to_array(reply.image).astype(int)

    outside, inside = await blurred("outside"), await blurred("inside")
    region, background = np.s_[80:170, 180:270], np.s_[300:, 300:]
    assert np.array_equal(outside[region], original[region])  # the person stays sharp
    assert np.abs(outside[background] - original[background]).mean() > 2  # the background is blurred
    assert not np.array_equal(inside[region], original[region])  # the default still blurs the region itself
    assert np.array_equal(inside[background], original[background])


async def test_a_truncated_jpeg_is_refused_not_half_grey(tools: dict[str, Stub]) -> None:
    whole = sample("astronaut.jpg")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(tools["filter"], "grayscale", data=whole[: len(whole) // 2])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "incomplete" in (refused.value.details() or "")
    assert (
        await call(tools["filter"], "grayscale", data=whole + b"\x00" * 100)
    ).image.width == 512  # trailing bytes are fine


async def test_blur_regions_outside_with_radius_zero_on_a_raw_frame(tools: dict[str, Stub]) -> None:
    raw = image_pb2.Image(data=bytes(64 * 48 * 3), media_type="image/x-raw-rgb8", width=64, height=48)
    box = image_pb2.Detection(label="person", score=0.9, box=image_pb2.BoundingBox(x=4, y=4, width=10, height=10))
    reply = await call(tools["filter"], "blur_regions", {"area": "outside", "radius": 0}, image=raw, detections=[box])
    assert (reply.image.width, reply.image.height) == (64, 48)


@pytest.mark.parametrize(
    ("tool", "params", "data", "code", "needle"),
    [
        ("resize", {"scale": 0.5}, b"not an image at all", grpc.StatusCode.INVALID_ARGUMENT, "corrupt"),
        ("resize", {"scale": 0.5}, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", grpc.StatusCode.INVALID_ARGUMENT, "not"),
        ("resize", {"scale": 0.5, "width": 3}, None, grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
        ("resize", {"scale": "big"}, None, grpc.StatusCode.INVALID_ARGUMENT, "params.scale"),
        ("blur", {"radius": 3, "sigma": 2}, None, grpc.StatusCode.INVALID_ARGUMENT, "params.sigma"),
        ("nope", {}, None, grpc.StatusCode.INVALID_ARGUMENT, "nope"),
        ("draw_boxes", {"color": "not-a-colour"}, None, grpc.StatusCode.INVALID_ARGUMENT, "colour"),
    ],
)
async def test_bad_input_gives_clear_codes(
    tools: dict[str, Stub], tool: str, params: dict, data: bytes | None, code: grpc.StatusCode, needle: str
) -> None:  # type: ignore[type-arg]
    stub = tools["filter"] if tool in ("blur", "draw_boxes") else tools["resize"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(stub, tool, params, data=data)
    assert caught.value.code() == code
    assert needle in (caught.value.details() or "")


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("L", (width, height)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


async def test_decompression_bomb_and_byte_limit(tools: dict[str, Stub]) -> None:
    bomb = _png(10_000, 5_000)  # 50 MP, a few KB encoded, over the 40 MP test limit
    assert len(bomb) < 200_000
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(tools["resize"], "resize", {"scale": 0.5}, data=bomb)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "pixels" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(tools["resize"], "resize", {"scale": 0.5}, data=b"\xff\xd8\xff" + b"\0" * (9 * 1024 * 1024))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    raw = image_pb2.Image(data=b"\0" * 10, media_type="image/x-raw-rgb8", width=4, height=4)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(tools["resize"], "flip", {"direction": "vertical"}, image=raw)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # and the service keeps serving
    assert (await call(tools["resize"], "resize", {"scale": 0.25})).image.width == 128


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(min_size=1, max_size=4096),
    prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBP"]),
)
async def test_random_bytes_never_crash_a_tool(tools: dict[str, Stub], data: bytes, prefix: bytes) -> None:
    try:
        await call(tools["filter"], "grayscale", data=prefix + data)
    except grpc.aio.AioRpcError as error:
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), error.details()


TOOL_CLI = [str(Path(sys.executable).parent / "imageflow-tool")]


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--event-loop", "libev"], {}, "event loop 'libev' is not one of auto, uvloop, asyncio"),
        ([], {"IMAGEFLOW_EVENT_LOOP": "libev"}, "IMAGEFLOW_EVENT_LOOP"),
        (["--log-level", "verbose"], {}, "log level 'verbose' is not one of debug, info, warning, error, critical"),
    ],
)
def test_the_tool_cli_refuses_a_bad_event_loop_or_log_level(args: list[str], env: dict[str, str], says: str) -> None:
    done = subprocess.run(
        [*TOOL_CLI, "resize", "--port", "0", "--host", "127.0.0.1", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200", **env},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert says in " ".join(done.stderr.split()), done.stderr


@pytest.mark.parametrize(("setting", "running"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_the_tool_cli_runs_on_the_event_loop_it_is_set_to(setting: str, running: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*TOOL_CLI, "resize", "--port", str(port), "--host", "127.0.0.1"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "IMAGEFLOW_EVENT_LOOP": setting},
    )  # fmt: skip
    try:
        wait_serving(f"127.0.0.1:{port}")
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"imageflow-tool resize serving on 127.0.0.1:{port} (event loop: {running})" in stderr


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_an_abandoned_chain_stops_at_the_next_step(how: str) -> None:
    """A caller that gives up (a cancel, or the chain's deadline: TimeoutError) stops the chain's worker after the
    step it is in, instead of leaving it to burn CPU on steps nobody will read."""
    import asyncio
    import threading
    import time

    from imageflow.tools.imaging import ImageLimits
    from imageflow.tools.plane import ChainStepSpec, ToolPlane
    from imageflow.tools.spec import ToolInput, ToolOutput, ToolSpec, object_schema

    ran: list[int] = []
    lock = threading.Lock()

    def slow(inp: ToolInput) -> ToolOutput:
        time.sleep(0.3)
        with lock:
            ran.append(1)
        return ToolOutput(pixels=inp.pixels)

    spec = ToolSpec("slow", "1", "遅い", "slow", object_schema({}), slow)
    plane = ToolPlane("test", (spec,), ImageLimits())
    try:
        pixels = np.zeros((8, 8, 3), np.uint8)
        steps = [ChainStepSpec("slow", {})] * 6
        if how == "deadline":
            with pytest.raises(TimeoutError):
                await plane.run_chain(steps, pixels=pixels, timeout_s=0.45)  # inside the second step
        else:
            task = asyncio.create_task(plane.run_chain(steps, pixels=pixels))
            await asyncio.sleep(0.45)  # inside the second step
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.sleep(1.5)  # long enough for the other four steps, had they run
        assert len(ran) == 2
    finally:
        plane.close()


def test_the_params_cache_tells_types_apart_and_hands_out_copies() -> None:
    """Seen params skip the schema check: `True`, `1` and `1.0` are different params, and a tool changing the params
    it was given does not change what the next call gets."""
    from imageflow.common.errors import ImageflowError
    from imageflow.tools import detection, geometry
    from imageflow.tools.plane import ToolPlane

    plane = ToolPlane("resize-grpc", geometry.TOOLS, ImageLimits(), workers=1)
    resize = plane.spec("resize")
    first = plane.checked_params(resize, {"scale": 0.5, "keep_aspect": True}, 0)
    assert first["keep_aspect"] is True and first["interpolation"] == "area"
    first["interpolation"] = "nearest"
    assert plane.checked_params(resize, {"scale": 0.5, "keep_aspect": True}, 0)["interpolation"] == "area"
    with pytest.raises(ImageflowError):
        plane.checked_params(resize, {"scale": 0.5, "keep_aspect": 1}, 0)
    detect = detection.detect_tool(
        detection.Detector(detection.OnnxRuntimeBackend.__new__(detection.OnnxRuntimeBackend))
    )
    nested = ToolPlane("ai-detection-grpc", (detect,), ImageLimits(), workers=1)
    classes = nested.checked_params(detect, {"classes": ["face"]}, 0)
    classes["classes"].append("car")
    assert nested.checked_params(detect, {"classes": ["face"]}, 0)["classes"] == ["face"]
    plane.close()
    nested.close()


async def test_the_image_travels_spliced_and_odd_bytes_get_what_protobuf_gives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Process and ProcessChain take the image's bytes where gRPC put them and splice the output around the response:
    a request that sends its image in two parts (protobuf merges them) gets the same answer as one that does not,
    and bytes that are no request are INVALID_ARGUMENT."""
    from imageflow.common.grpc_errors import error_reason
    from imageflow.common.wire import length_delimited
    from imageflow.tools.servicer import ToolServicer

    spliced: list[str] = []
    for method in ("process_spliced", "process_chain_spliced"):
        original = getattr(ToolServicer, method)

        async def spy(
            self: ToolServicer, received: Any, context: Any, original: Any = original, name: str = method
        ) -> Any:
            spliced.append(name)
            return await original(self, received, context)

        monkeypatch.setattr(ToolServicer, method, spy)
    server = await start_tool_server("filter")
    try:
        async with aio_channel(server.address) as channel:
            raw = channel.unary_unary("/imageflow.v1.ToolService/Process")  # bytes in, bytes out
            image = image_pb2.Image(data=sample("chelsea.jpg"))
            request = tool_service_pb2.ProcessRequest(tool="blur", params=dict_to_struct({"radius": 2}),
                                                      output_media_type="image/x-raw")  # fmt: skip
            whole = b"".join([request.SerializeToString(), *length_delimited(3, image.SerializeToString())])
            data_alone, fields_alone = image_pb2.Image(data=image.data), image_pb2.Image(media_type="image/jpeg")
            split = b"".join([request.SerializeToString(), *length_delimited(3, data_alone.SerializeToString()),
                              *length_delimited(3, fields_alone.SerializeToString())])  # fmt: skip
            one_wire = await raw(whole)
            one = tool_service_pb2.ProcessResponse.FromString(one_wire)
            two = tool_service_pb2.ProcessResponse.FromString(await raw(split))
            assert one == two and one.image.media_type == "image/x-raw-rgb8" and len(one.image.data) == 451 * 300 * 3
            assert one_wire.endswith(one.image.data)  # spliced in last (protobuf writes the image, field 1, first)
            chain = await Stub(channel).ProcessChain(tool_service_pb2.ProcessChainRequest(
                steps=[tool_service_pb2.ChainStep(tool="blur", params=request.params)], image=image,
                output_media_type="image/x-raw"))  # fmt: skip
            assert chain.image == one.image and len(chain.results) == 1
            assert spliced == ["process_spliced", "process_spliced", "process_chain_spliced"]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await raw(b"\x1a\x02\x12\x01")  # an image whose media_type is cut short
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_reason(refused.value) == "REQUEST_UNDECODABLE"
    finally:
        await server.stop(0.1)
