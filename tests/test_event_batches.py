"""`batch_events`: the events that are ready travel together in one stream message; the same events, in the same
order, as one per message; fast embedded steps are handed to the event loop in groups."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from imageflow.client import AsyncImageflowClient
from imageflow.common.structs import dict_to_struct
from imageflow.server.adapters.api.requests import (
    EXECUTE_METHOD,
    REQUEST_PARSERS,
    ReceivedExecute,
    parse_execute_request,
)
from imageflow.server.adapters.embedded import _ProgressRelay
from imageflow.server.app import ControlPlane, start_control_plane
from imageflow.server.domain.executor import ToolResult
from imageflow.server.domain.frames import ImageHeader
from imageflow.server.settings import Settings
from imageflow.v1 import execution_pb2, image_pb2, pipeline_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc

from tests.conftest import aio_channel, sample


def flips(count: int) -> pipeline_pb2.Pipeline:
    definition = pipeline_pb2.Pipeline(name="flips")
    for index in range(count):
        params = dict_to_struct({"direction": "horizontal" if index % 2 == 0 else "vertical"})
        definition.steps.add(id=f"s{index}", tool="flip", params=params, depends_on=[f"s{index - 1}"] if index else [])
    return definition


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def planes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, ControlPlane]]:
    made = {}
    for name, in_process in (("in-process", True), ("grpc", False)):
        tmp = tmp_path_factory.mktemp(name)
        settings = Settings(
            host="127.0.0.1", port=0, database_url=f"sqlite:///{tmp / 'db.sqlite'}", embedded_in_process=in_process
        )
        made[name] = await start_control_plane(settings)
    yield made
    for plane in made.values():
        await plane.stop(0.5)


def _shape(events: list[execution_pb2.ExecutionEvent]) -> list[tuple[int, str, str]]:
    """What must match between two runs of one pipeline: sequence, kind and step."""
    shape = []
    for event in events:
        kind = event.WhichOneof("kind") or ""
        shape.append((event.sequence, kind, getattr(getattr(event, kind), "step_id", "")))
    return shape


@pytest.mark.parametrize("mode", ["in-process", "grpc"])
async def test_batched_streams_carry_the_same_events_as_one_per_message(
    planes: dict[str, ControlPlane], mode: str
) -> None:
    image = image_pb2.Image(data=sample("chelsea.jpg"))
    async with aio_channel(planes[mode].address) as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        single = pipeline_service_pb2.ExecutePipelineRequest(pipeline=flips(16), inputs={"image": image})
        singles = [reply async for reply in stub.ExecutePipeline(single)]
        batched_request = pipeline_service_pb2.ExecutePipelineRequest(
            pipeline=flips(16), inputs={"image": image}, batch_events=True
        )
        batches = [reply async for reply in stub.ExecutePipeline(batched_request)]
        events = [event for reply in batches for event in reply.events]
        execution_id = events[0].execution_id
        replay = [
            reply
            async for reply in stub.WatchExecution(
                pipeline_service_pb2.WatchExecutionRequest(execution_id=execution_id, batch_events=True)
            )
        ]
        replay_single = [
            reply
            async for reply in stub.WatchExecution(
                pipeline_service_pb2.WatchExecutionRequest(execution_id=execution_id)
            )
        ]

    assert all(len(reply.events) == 0 and reply.HasField("event") for reply in singles)
    assert all(len(reply.events) >= 1 and not reply.HasField("event") for reply in batches)
    assert _shape(events) == _shape([reply.event for reply in singles])  # same events, same order
    assert [e.sequence for e in events] == list(range(1, 2 + 2 * 16 + 1))  # none lost or repeated
    finished = events[-1].execution_finished
    assert finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED and finished.outputs[0].image.data
    assert len(batches) < len(events)  # fast steps' events travel together
    # live, the finished event with its output image (far below JOIN_MAX_BYTES) ends the last message
    assert batches[-1].events[-1] == events[-1]
    # a finished execution's replay: the step events in one message (at most MAX_BATCH), the finished one with its bytes
    # read back from the store alone (their size is not known when the batch is cut)
    assert [len(reply.events) for reply in replay] == [len(events) - 1, 1]
    assert [event for reply in replay for event in reply.events] == events
    assert [reply.event for reply in replay_single] == events


async def test_steps_finished_while_the_loop_is_busy_are_delivered_together() -> None:
    current: list[int] = []

    def deliver(index: int, result: ToolResult, seconds: float) -> None:
        current.append(index)

    loop = asyncio.get_running_loop()
    relay = _ProgressRelay(loop, deliver, window_s=0.5)
    result = ToolResult(b"", ImageHeader("image/x-raw-rgb8", 1, 1))

    def worker(indexes: range) -> None:
        for index in indexes:
            relay.put(index, result, 0.0)

    thread = threading.Thread(target=worker, args=(range(5),))
    thread.start()
    thread.join()  # the loop is blocked here: all five are waiting when it next runs
    await asyncio.sleep(0)
    assert current == [0, 1, 2, 3, 4]  # one wake-up delivered all five, in order
    current.clear()

    worker(range(5, 7))  # within the window after a delivery: they wait for the next look, not a wake-up each
    await asyncio.sleep(0)
    assert current == []
    await asyncio.sleep(0.6)
    assert current == [5, 6]
    current.clear()

    await asyncio.sleep(0.6)  # a look that found nothing disarms: the next step wakes the loop at once
    worker(range(7, 8))
    await asyncio.sleep(0)
    assert current == [7]
    worker(range(8, 10))
    relay.flush()  # the chain's end: whatever is left is delivered now
    assert current == [7, 8, 9]
    relay.close()


async def test_a_chains_last_step_waits_for_the_flush_instead_of_waking_the_loop() -> None:
    """The chain's end wakes the loop anyway; its last step is reported by `flush`, first, not by a wake-up of its
    own (and a look already due still takes it)."""
    current: list[int] = []
    loop = asyncio.get_running_loop()
    relay = _ProgressRelay(loop, lambda index, result, seconds: current.append(index), window_s=0.5)
    result = ToolResult(b"", ImageHeader("image/x-raw-rgb8", 1, 1))
    relay.put(0, result, 0.0, wake=False)
    await asyncio.sleep(0.6)  # longer than the window: nothing looks, so nothing is delivered
    assert current == []
    relay.flush()
    assert current == [0]
    relay.put(1, result, 0.0)  # wakes the loop: the look is queued
    relay.put(2, result, 0.0, wake=False)  # the queued look takes it too
    await asyncio.sleep(0)
    assert current == [0, 1, 2]
    relay.close()


async def test_the_sdk_asks_for_batches_and_yields_single_events(planes: dict[str, ControlPlane]) -> None:
    async with AsyncImageflowClient(planes["in-process"].address) as client:
        events = [e async for e in client.execute(flips(4), {"image": image_pb2.Image(data=sample("chelsea.jpg"))})]
        replay = [e async for e in client.watch(events[0].execution_id)]
    assert [e.sequence for e in events] == list(range(1, 2 + 2 * 4 + 1)) and replay == events


async def test_the_server_parses_execute_requests_with_the_inputs_left_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The servicer also accepts a plain message, so only this shows the parser is installed."""
    seen: list[ReceivedExecute] = []

    def spying(data: bytes) -> ReceivedExecute:
        received = parse_execute_request(data)
        seen.append(received)
        return received

    monkeypatch.setitem(REQUEST_PARSERS, EXECUTE_METHOD, spying)
    settings = Settings(host="127.0.0.1", port=0, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}")
    plane = await start_control_plane(settings)
    try:
        async with AsyncImageflowClient(plane.address) as client:
            events = [e async for e in client.execute(flips(2), {"image": image_pb2.Image(data=sample("chelsea.jpg"))})]
    finally:
        await plane.stop(0.5)
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
    assert len(seen) == 1 and isinstance(seen[0].inputs["image"].serialized, memoryview)
