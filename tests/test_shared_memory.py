"""Opt-in shared memory between the control plane and tool services on one host: raw frames between steps stay in
/dev/shm (handles in the messages), the bytes are the same as inline, nothing is left behind, and a tool reads only
objects ImageFlow made."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from imageflow.common.shm import SHM_DIR
from imageflow.common.structs import dict_to_struct
from imageflow.server.app import ControlPlane, start_control_plane
from imageflow.server.settings import Settings
from imageflow.v1 import (
    execution_pb2,
    image_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_service_pb2,
    tool_service_pb2_grpc,
)

from tests.conftest import aio_channel, sample

STEPS: list[tuple[str, str, dict[str, Any], list[str]]] = [
    ("small", "resize", {"scale": 0.5}, []),
    ("gray", "grayscale", {}, ["small"]),
    ("turn", "rotate", {"angle": 90}, ["gray"]),
    ("soft", "blur", {"radius": 2}, ["turn"]),
]


def objects() -> set[str]:
    return {p.name for p in SHM_DIR.glob("imageflow-*")}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def planes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[bool, ControlPlane]]:
    made = {}
    for shared in (True, False):
        db = tmp_path_factory.mktemp(f"shm-{shared}") / "db.sqlite"
        made[shared] = await start_control_plane(
            Settings(
                host="127.0.0.1",
                port=0,
                database_url=f"sqlite:///{db}",
                embedded_in_process=False,
                tool_shared_memory=shared,
            )
        )
    yield made
    for plane in made.values():
        await plane.stop(0.5)


async def outputs(plane: ControlPlane) -> list[image_pb2.Image]:
    definition = pipeline_pb2.Pipeline(name="shm")
    for step_id, tool, params, deps in STEPS:
        definition.steps.add(id=step_id, tool=tool, params=dict_to_struct(params), depends_on=deps)
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=definition, inputs={"image": image_pb2.Image(data=sample("astronaut.jpg"))}
    )
    async with aio_channel(plane.address) as channel:
        events = [r.event async for r in pipeline_service_pb2_grpc.PipelineServiceStub(channel).ExecutePipeline(request)]
    finished = events[-1].execution_finished
    assert finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED, finished.message
    images = [output.image for output in finished.outputs]
    for image in images:
        image.ClearField("blob_ref")  # it names the execution; the pixels are what must match
    return images


async def test_frames_through_shared_memory_give_the_same_bytes_and_leave_nothing(
    planes: dict[bool, ControlPlane],
) -> None:
    before = objects()
    assert await outputs(planes[True]) == await outputs(planes[False])
    gc.collect()
    assert objects() == before


async def test_a_tool_returns_a_handle_and_reads_one(planes: dict[bool, ControlPlane]) -> None:
    address = next(s.address for s in planes[True].tool_servers if s.kind == "filter")
    async with aio_channel(address) as channel:
        stub = tool_service_pb2_grpc.ToolServiceStub(channel)
        first = await stub.Process(tool_service_pb2.ProcessRequest(
            tool="grayscale", image=image_pb2.Image(data=sample("chelsea.jpg")), output_media_type="image/x-raw",
            output_to_shared_memory=True))  # fmt: skip
        region = first.image.shared_memory
        assert first.image.data == b"" and region.byte_size == 451 * 300
        try:
            second = await stub.Process(
                tool_service_pb2.ProcessRequest(tool="blur", image=first.image, output_media_type="image/png")
            )
            assert second.image.data.startswith(b"\x89PNG") and (second.image.width, second.image.height) == (451, 300)
        finally:
            (SHM_DIR / region.name).unlink()


@pytest.mark.parametrize(
    ("name", "code"),
    [("../../etc/passwd", grpc.StatusCode.INVALID_ARGUMENT), ("imageflow-" + "0" * 32, grpc.StatusCode.FAILED_PRECONDITION)],
)
async def test_a_tool_reads_only_objects_imageflow_made(
    planes: dict[bool, ControlPlane], name: str, code: grpc.StatusCode
) -> None:
    address = next(s.address for s in planes[True].tool_servers if s.kind == "filter")
    image = image_pb2.Image(media_type="image/x-raw-gray8", width=2, height=2)
    image.shared_memory.name, image.shared_memory.byte_size = name, 4
    async with aio_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await tool_service_pb2_grpc.ToolServiceStub(channel).Process(
                tool_service_pb2.ProcessRequest(tool="blur", image=image)
            )
    assert refused.value.code() == code

