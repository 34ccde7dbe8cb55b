"""Embedded tools in process: steps are direct calls on decoded frames, with the same bytes as the gRPC path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from imageflow.common.structs import dict_to_struct
from imageflow.server.app import ControlPlane, start_control_plane
from imageflow.server.settings import Settings
from imageflow.v1 import execution_pb2, image_pb2, pipeline_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc

from tests.conftest import aio_channel, sample

PIPELINES: dict[str, list[tuple[str, str, dict[str, Any], list[str]]]] = {
    "chain": [
        ("small", "resize", {"scale": 0.5}, []),
        ("gray", "grayscale", {}, ["small"]),
        ("soft", "blur", {"radius": 2}, ["gray"]),
    ],
    "faces": [
        ("people", "detect", {"classes": ["face", "person"]}, []),
        ("hide", "blur_regions", {"method": "pixelate"}, ["people"]),
        ("boxes", "draw_boxes", {}, ["hide"]),
        ("png", "encode", {"format": "png"}, ["boxes"]),
    ],
    "diamond": [
        ("root", "rotate", {"angle": 30}, []),
        ("left", "edge_detect", {}, ["root"]),
        ("right", "adjust", {"brightness": 0.7}, ["root"]),
        ("join", "sharpen", {}, ["right", "left"]),
        ("side", "threshold", {"method": "otsu"}, ["root"]),
    ],
    "luma": [  # resize feeds two luma readers: asked for raw gray, decoded as luma (crop, resize: one chain)
        ("cut", "crop", {"width": 300, "height": 200, "anchor": "center"}, []),
        ("small", "resize", {"scale": 0.5}, ["cut"]),
        ("gray", "grayscale", {}, ["small"]),
        ("soft", "blur", {"radius": 2}, ["gray"]),
        ("edges", "threshold", {"method": "otsu"}, ["small"]),
    ],
    "geometry": [
        ("crop", "crop", {"width": 300, "height": 200, "anchor": "center"}, []),
        ("flip", "flip", {"direction": "vertical"}, ["crop"]),
        ("webp", "encode", {"format": "webp", "quality": 70}, ["flip"]),
    ],
}


async def _plane(tmp: Path, in_process: bool) -> ControlPlane:
    settings = Settings(
        host="127.0.0.1", port=0, database_url=f"sqlite:///{tmp / 'db.sqlite'}", embedded_in_process=in_process
    )
    return await start_control_plane(settings)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def both(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[ControlPlane, ControlPlane]]:
    local = await _plane(tmp_path_factory.mktemp("local"), True)
    remote = await _plane(tmp_path_factory.mktemp("remote"), False)
    yield local, remote
    await local.stop(0.5)
    await remote.stop(0.5)


async def _outputs(address: str, steps: list[tuple[str, str, dict[str, Any], list[str]]], image: bytes) -> Any:
    definition = pipeline_pb2.Pipeline(name="same-bytes")
    for step_id, tool, params, deps in steps:
        definition.steps.add(id=step_id, tool=tool, params=dict_to_struct(params), depends_on=deps)
    request = pipeline_service_pb2.ExecutePipelineRequest(pipeline=definition, inputs={"image": image_pb2.Image(data=image)})
    async with aio_channel(address) as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        events = [reply.event async for reply in stub.ExecutePipeline(request)]
    finished = events[-1].execution_finished
    assert finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED, finished.message
    return {
        out.step_id: (out.image.data, out.image.media_type, out.image.width, out.image.height, list(out.detections))
        for out in finished.outputs
    }


@pytest.mark.parametrize("name", sorted(PIPELINES))
@pytest.mark.parametrize("source", ["astronaut.jpg", "coffee.jpg"])
async def test_in_process_gives_the_same_bytes_as_the_grpc_path(
    both: tuple[ControlPlane, ControlPlane], name: str, source: str
) -> None:
    local, remote = both
    image = sample(source)
    assert await _outputs(local.address, PIPELINES[name], image) == await _outputs(remote.address, PIPELINES[name], image)


async def test_embedded_steps_do_not_cross_grpc(both: tuple[ControlPlane, ControlPlane]) -> None:
    """With the loopback tool servers stopped, in-process steps still run: nothing is dialled."""
    local, _ = both
    for server in local.tool_servers:
        await server.grpc.stop(0)
    outputs = await _outputs(local.address, PIPELINES["chain"], sample("chelsea.jpg"))
    assert outputs["soft"][1] == "image/jpeg"


def _definition(steps: list[tuple[str, str, dict[str, Any], list[str]]]) -> pipeline_pb2.Pipeline:
    definition = pipeline_pb2.Pipeline(name="across")
    for step_id, tool, params, deps in steps:
        definition.steps.add(id=step_id, tool=tool, params=dict_to_struct(params), depends_on=deps)
    return definition


async def _events(address: str, definition: pipeline_pb2.Pipeline, image: bytes) -> list[tuple[str, str, str]]:
    request = pipeline_service_pb2.ExecutePipelineRequest(pipeline=definition, inputs={"image": image_pb2.Image(data=image)})
    async with aio_channel(address) as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        events = [reply.event async for reply in stub.ExecutePipeline(request)]
    shape = []
    for event in events:
        kind = event.WhichOneof("kind")
        body = getattr(event, kind)
        shape.append((kind, getattr(body, "step_id", ""), getattr(body, "code", "") or str(getattr(body, "state", ""))))
    return shape


async def test_a_run_across_embedded_services_is_one_chain_reported_step_by_step(
    both: tuple[ControlPlane, ControlPlane],
) -> None:
    """crop (resize) → grayscale (filter) → resize (resize) → blur (filter): in process, one worker job; the third step
    fails at run time (its output would be over the pixel limit) and both paths report the same events."""
    local, remote = both
    steps = [
        ("cut", "crop", {"width": 40, "height": 30}, []),
        ("gray", "grayscale", {}, ["cut"]),
        ("huge", "resize", {"width": 60000}, ["gray"]),
        ("soft", "blur", {"radius": 2}, ["huge"]),
    ]
    definition = _definition(steps)
    assert local.catalog.compile(definition).chains == {"cut": ("cut", "gray", "huge", "soft")}
    assert remote.catalog.compile(definition).chains == {}  # over gRPC a chain stays on one service
    # detection keeps its own workers (and their bound): a detect step never joins the pixel services' chain
    detecting = _definition([("small", "resize", {"scale": 0.5}, []), ("people", "detect", {}, ["small"])])
    assert local.catalog.compile(detecting).chains == {}
    image = sample("chelsea.jpg")
    here, there = await _events(local.address, definition, image), await _events(remote.address, definition, image)
    assert here == there
    assert [(kind, step) for kind, step, _ in here if kind.startswith("step_")] == [
        ("step_started", "cut"), ("step_succeeded", "cut"), ("step_started", "gray"), ("step_succeeded", "gray"),
        ("step_started", "huge"), ("step_failed", "huge"), ("step_skipped", "soft"),
    ]  # fmt: skip
    assert ("step_failed", "huge", "RESOURCE_EXHAUSTED") in here
    # and a run that succeeds across services gives the same bytes both ways (see the parametrized test above)
    succeeding = [*steps[:2], ("soft", "blur", {"radius": 2}, ["gray"])]
    assert await _outputs(local.address, succeeding, image) == await _outputs(remote.address, succeeding, image)


async def test_grpc_path_needs_its_servers(tmp_path: Path) -> None:
    """The control case for the test above: the loopback path does dial the tool servers."""
    remote = await _plane(tmp_path, False)
    try:
        for server in remote.tool_servers:
            await server.grpc.stop(0)
        with pytest.raises(AssertionError):
            await _outputs(remote.address, PIPELINES["chain"][:1], sample("chelsea.jpg"))
    finally:
        await remote.stop(0.5)



async def test_omit_step_events_streams_and_stores_only_start_and_finish(
    both: tuple[ControlPlane, ControlPlane],
) -> None:
    _, remote = both
    definition = pipeline_pb2.Pipeline(name="quiet")
    definition.steps.add(id="gray", tool="grayscale")
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=definition, inputs={"image": image_pb2.Image(data=sample("chelsea.jpg"))}, omit_step_events=True
    )
    async with aio_channel(remote.address) as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        events = [reply.event async for reply in stub.ExecutePipeline(request)]
        replayed = [
            reply.event
            async for reply in stub.WatchExecution(
                pipeline_service_pb2.WatchExecutionRequest(execution_id=events[0].execution_id)
            )
        ]
    assert [e.WhichOneof("kind") for e in events] == ["execution_started", "execution_finished"]
    assert [e.sequence for e in events] == [1, 2] and replayed == events
    assert events[-1].execution_finished.outputs[0].image.media_type == "image/jpeg"
