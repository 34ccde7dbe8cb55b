"""Outputs apart from events: the event log (and so Kafka) holds references, never pixels; the client still gets its
outputs from the stream, GetExecution and WatchExecution while they are retained."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from imageflow.client import AsyncImageflowClient, ImageflowClient
from imageflow.common.serving import start_grpc_server
from imageflow.common.structs import dict_to_struct
from imageflow.server.app import ControlPlane, start_control_plane
from imageflow.server.domain.executor import MAX_TOOL_MESSAGE, ToolCallError
from imageflow.server.domain.outputs import fit_result
from imageflow.server.settings import Settings
from imageflow.v1 import (
    execution_pb2,
    image_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_pb2,
    tool_registry_service_pb2,
    tool_service_pb2,
    tool_service_pb2_grpc,
)
from pydantic import ValidationError

from tests.conftest import aio_channel, sample


def _images(event: execution_pb2.ExecutionEvent) -> list[image_pb2.Image]:
    return [o.image for o in event.execution_finished.outputs if o.image.media_type]


async def test_the_event_log_holds_no_image_bytes(plane: ControlPlane, pipelines) -> None:  # type: ignore[no-untyped-def]
    pipeline = pipeline_pb2.Pipeline(name="two outputs")
    pipeline.steps.add(id="gray", tool="grayscale")
    pipeline.steps.add(id="edges", tool="edge_detect")
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=pipeline, inputs={"image": image_pb2.Image(data=sample("astronaut.jpg"))}
    )
    streamed = [r.event async for r in pipelines.ExecutePipeline(request)]
    live = _images(streamed[-1])
    assert len(live) == 2 and all(i.data and i.blob_ref for i in live)  # the stream: bytes inline, and the ref

    stored = [
        execution_pb2.ExecutionEvent.FromString(e.payload)
        for e in await plane.store.list_events(streamed[0].execution_id, 0)
    ]
    assert sum(len(e.payload) for e in await plane.store.list_events(streamed[0].execution_id, 0)) < 4096
    assert [i.blob_ref for i in _images(stored[-1])] == [i.blob_ref for i in live]
    assert not any(i.data for i in _images(stored[-1]))

    got = await pipelines.GetExecution(pipeline_service_pb2.GetExecutionRequest(execution_id=streamed[0].execution_id))
    assert [o.image.data for o in got.execution.outputs] == [i.data for i in live]
    replay = [r.event async for r in pipelines.WatchExecution(
        pipeline_service_pb2.WatchExecutionRequest(execution_id=streamed[0].execution_id))]  # fmt: skip
    assert [i.data for i in _images(replay[-1])] == [i.data for i in live]

    # past the retention the references stay and the bytes are gone, said plainly by an empty `data`
    await plane.store.delete_blobs_before(datetime.now(UTC) + timedelta(seconds=1))
    got = await pipelines.GetExecution(pipeline_service_pb2.GetExecutionRequest(execution_id=streamed[0].execution_id))
    assert all(o.image.blob_ref and not o.image.data for o in got.execution.outputs)


CORNERS = bytes([250, 10, 10, 10, 250, 10, 10, 10, 250, 240, 240, 20])
"""A 2×2 RGB input: red, green / blue, yellow."""


def _outputs(*sides: int) -> pipeline_pb2.Pipeline:
    """A raw RGB output of side² pixels for each side, from the 2×2 input."""
    pipeline = pipeline_pb2.Pipeline(name="big", outputs=[f"s{i}" for i in range(len(sides))])
    for i, side in enumerate(sides):
        size = {"width": side, "height": side, "interpolation": "nearest"}
        pipeline.steps.add(id=f"s{i}", tool="resize", params=dict_to_struct(size))
    return pipeline


def _two_outputs(big_side: int) -> pipeline_pb2.Pipeline:
    return _outputs(big_side, 10)


async def _read(
    stub: pipeline_service_pb2_grpc.PipelineServiceStub, execution_id: str, ref: str, offset: int = 0
) -> tuple[list[pipeline_service_pb2.ReadExecutionOutputResponse], bytes]:
    replies = [
        r
        async for r in stub.ReadExecutionOutput(
            pipeline_service_pb2.ReadExecutionOutputRequest(execution_id=execution_id, blob_ref=ref, offset=offset)
        )
    ]
    return replies, b"".join(r.data for r in replies)


async def test_an_image_too_large_for_one_message_is_left_out_and_read_in_pieces(tmp_path: Path) -> None:
    """With IMAGEFLOW_MAX_MESSAGE_BYTES at 8 MiB, a raw 2000×2000 RGB output (12 MB) cannot travel in the finished
    event: the execution succeeds, the event carries the image's size and ref without its bytes (the stream,
    GetExecution and a replay alike), the small output beside it stays inline, and ReadExecutionOutput returns the
    bytes in pieces of at most 1 MiB, from any offset. The SDK reads them for its caller."""
    limit = 8 * 1024 * 1024
    plane = await start_control_plane(
        Settings(host="127.0.0.1", port=0, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", max_message_bytes=limit)
    )
    tiny = image_pb2.Image(data=CORNERS, media_type="image/x-raw-rgb8", width=2, height=2)
    try:
        async with aio_channel(plane.address) as channel:
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            request = pipeline_service_pb2.ExecutePipelineRequest(pipeline=_two_outputs(2000), inputs={"image": tiny})
            streamed = [r.event async for r in stub.ExecutePipeline(request)]
            execution_id = streamed[0].execution_id
            finished = streamed[-1].execution_finished
            assert finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED, finished.message
            big, small = (o.image for o in finished.outputs)
            assert (big.data, big.data_bytes, big.width, big.media_type) == (b"", 12_000_000, 2000, "image/x-raw-rgb8")
            assert big.blob_ref and len(small.data) == 300 and not small.data_bytes

            got = await stub.GetExecution(pipeline_service_pb2.GetExecutionRequest(execution_id=execution_id))
            replay = [r.event async for r in stub.WatchExecution(
                pipeline_service_pb2.WatchExecutionRequest(execution_id=execution_id))]  # fmt: skip
            for outputs in (got.execution.outputs, replay[-1].execution_finished.outputs):
                assert [(o.image.data, o.image.data_bytes) for o in outputs] == [(b"", 12_000_000), (small.data, 0)]

            replies, whole = await _read(stub, execution_id, big.blob_ref)
            assert len(whole) == 12_000_000 and len(replies) == 12
            assert all(len(r.data) <= 1024 * 1024 for r in replies)
            assert [r.data_bytes for r in replies] == [12_000_000] + [0] * 11
            assert whole[:3] == CORNERS[:3] and whole[-3:] == CORNERS[-3:]  # red top left, yellow bottom right
            _, tail = await _read(stub, execution_id, big.blob_ref, offset=11_999_990)
            assert tail == whole[-10:]
            _, small_again = await _read(stub, execution_id, small.blob_ref)  # any retained output reads so
            assert small_again == small.data

            sync = ImageflowClient(plane.address)
            try:
                events = await asyncio.to_thread(lambda: list(sync.execute(_two_outputs(2000), {"image": tiny})))
                assert [o.image.data for o in events[-1].execution_finished.outputs] == [whole, small.data]
                assert not events[-1].execution_finished.outputs[0].image.data_bytes
                execution = await asyncio.to_thread(sync.get_execution, execution_id)
                assert [o.image.data for o in execution.outputs] == [whole, small.data]
            finally:
                sync.close()
            async with AsyncImageflowClient(channel=channel) as client:
                events = [e async for e in client.execute(_two_outputs(2000), {"image": tiny})]
                assert [o.image.data for o in events[-1].execution_finished.outputs] == [whole, small.data]
                replayed = [e async for e in client.watch(execution_id)]
                assert replayed[-1].execution_finished.outputs[0].image.data == whole
                assert (await client.get_execution(execution_id)).outputs[0].image.data == whole

            # a 12 MB, a 3 MB and a 300-byte image: only the largest is left out, live and in replays
            request = pipeline_service_pb2.ExecutePipelineRequest(
                pipeline=_outputs(2000, 1000, 10), inputs={"image": tiny}
            )
            streamed = [r.event async for r in stub.ExecutePipeline(request)]
            live = streamed[-1].execution_finished.outputs
            got = await stub.GetExecution(
                pipeline_service_pb2.GetExecutionRequest(execution_id=streamed[0].execution_id)
            )
            for outputs in (live, got.execution.outputs):
                assert [(len(o.image.data), o.image.data_bytes) for o in outputs] == [
                    (0, 12_000_000),
                    (3_000_000, 0),
                    (300, 0),
                ]
            # two equal images of which one fits: the same one is left out live and in a replay
            request = pipeline_service_pb2.ExecutePipelineRequest(pipeline=_outputs(1300, 1300), inputs={"image": tiny})
            streamed = [r.event async for r in stub.ExecutePipeline(request)]
            got = await stub.GetExecution(
                pipeline_service_pb2.GetExecutionRequest(execution_id=streamed[0].execution_id)
            )
            for outputs in (streamed[-1].execution_finished.outputs, got.execution.outputs):
                assert [o.image.data_bytes for o in outputs] == [0, 1300 * 1300 * 3]

            # past the retention: no bytes and no size, the ref stays
            await plane.store.delete_blobs_before(datetime.now(UTC) + timedelta(seconds=1))
            got = await stub.GetExecution(pipeline_service_pb2.GetExecutionRequest(execution_id=execution_id))
            assert [(o.image.data, o.image.data_bytes) for o in got.execution.outputs] == [(b"", 0), (b"", 0)]
            assert got.execution.outputs[0].image.blob_ref == big.blob_ref
            async with AsyncImageflowClient(channel=channel) as client:  # the SDK hands the event over all the same
                execution = await client.get_execution(execution_id)
                assert [(o.image.data, o.image.data_bytes) for o in execution.outputs] == [(b"", 0), (b"", 0)]

            # under the limit the image travels inline, as before
            request = pipeline_service_pb2.ExecutePipelineRequest(pipeline=_two_outputs(1000), inputs={"image": tiny})
            inline = [r.event async for r in stub.ExecutePipeline(request)][-1].execution_finished
            assert len(inline.outputs[0].image.data) == 3_000_000 and not inline.outputs[0].image.data_bytes
    finally:
        await plane.stop(0.5)


async def test_reading_an_output_answers_bad_requests_plainly(plane: ControlPlane, pipelines) -> None:  # type: ignore[no-untyped-def]
    """INVALID_ARGUMENT and NOT_FOUND, each naming what was wrong; past the retention the output is NOT_FOUND and the
    execution's outputs say so by an empty `data` and `data_bytes`."""
    tiny = image_pb2.Image(data=CORNERS, media_type="image/x-raw-rgb8", width=2, height=2)
    runs = []
    for _ in range(2):
        request = pipeline_service_pb2.ExecutePipelineRequest(pipeline=_two_outputs(100), inputs={"image": tiny})
        runs.append([r.event async for r in pipelines.ExecutePipeline(request)])
    execution_id, other = (run[0].execution_id for run in runs)
    ref = runs[0][-1].execution_finished.outputs[0].image.blob_ref
    other_ref = runs[1][-1].execution_finished.outputs[0].image.blob_ref
    cases = [
        ("", ref, 0, grpc.StatusCode.INVALID_ARGUMENT, "execution_id is required"),
        (execution_id, "", 0, grpc.StatusCode.INVALID_ARGUMENT, "blob_ref is required"),
        (execution_id, ref, -1, grpc.StatusCode.INVALID_ARGUMENT, "offset must not be negative; got -1"),
        (execution_id, ref, 30_001, grpc.StatusCode.INVALID_ARGUMENT, "offset 30001 is past the end of the output (30000 bytes)"),
        ("ex_nope", ref, 0, grpc.StatusCode.NOT_FOUND, "execution 'ex_nope' does not exist"),
        (execution_id, other_ref, 0, grpc.StatusCode.NOT_FOUND, "has no output"),
    ]  # fmt: skip
    for ex, blob_ref, offset, code, says in cases:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _read(pipelines, ex, blob_ref, offset)
        assert raised.value.code() == code and says in str(raised.value.details()), (ex, blob_ref, offset)
    replies, end = await _read(pipelines, execution_id, ref, offset=30_000)  # the end itself: nothing more
    assert end == b"" and [r.data_bytes for r in replies] == [30_000]

    await plane.store.delete_blobs_before(datetime.now(UTC) + timedelta(seconds=1))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _read(pipelines, other, other_ref)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND and "retention" in str(raised.value.details())
    got = await pipelines.GetExecution(pipeline_service_pb2.GetExecutionRequest(execution_id=other))
    assert [(o.image.data, o.image.data_bytes) for o in got.execution.outputs] == [(b"", 0), (b"", 0)]


def test_the_largest_images_are_left_out_first_until_the_result_fits() -> None:
    """Measured without encoding the images, and never under the real size: what is sent fits the limit."""
    finished = execution_pb2.ExecutionFinished(state=execution_pb2.EXECUTION_STATE_SUCCEEDED)
    for index, (step_id, size) in enumerate((("a", 5000), ("b", 9000), ("c", 100), ("d", 7000), ("e", 5000))):
        image = image_pb2.Image(
            data=bytes(size), media_type="image/png", blob_ref=f"ex_0123456789abcdef/{index}/{step_id}"
        )
        finished.outputs.add(step_id=step_id, image=image)
    limit = finished.ByteSize() - 9000 - 1  # leaving out b alone is 1 byte short
    fit_result(finished, limit)
    assert [o.image.data_bytes for o in finished.outputs] == [0, 9000, 0, 7000, 0]
    assert all(o.image.data for o in finished.outputs)  # the bytes stay until the log has stored them
    for output in finished.outputs:
        if output.image.data_bytes:
            output.image.ClearField("data")
    assert finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED and finished.ByteSize() <= limit

    tie = execution_pb2.ExecutionFinished(state=execution_pb2.EXECUTION_STATE_SUCCEEDED)
    for step_id in ("x", "y"):
        tie.outputs.add(step_id=step_id, image=image_pb2.Image(data=bytes(5000), media_type="image/png"))
    fit_result(tie, 8000)  # one of two equal images fits: the first in output order stays
    assert [o.image.data_bytes for o in tie.outputs] == [0, 5000]


@pytest.mark.parametrize(
    ("state", "message", "becomes"),
    [
        (execution_pb2.EXECUTION_STATE_SUCCEEDED, "", execution_pb2.EXECUTION_STATE_FAILED),
        (execution_pb2.EXECUTION_STATE_PARTIALLY_SUCCEEDED, "step 'b' failed", execution_pb2.EXECUTION_STATE_FAILED),
        (execution_pb2.EXECUTION_STATE_CANCELLED, "cancelled", execution_pb2.EXECUTION_STATE_CANCELLED),
        (execution_pb2.EXECUTION_STATE_FAILED, "step 'b' failed", execution_pb2.EXECUTION_STATE_FAILED),
    ],
)
def test_detections_over_the_limit_drop_the_outputs_and_say_why(state: int, message: str, becomes: int) -> None:
    """Detections cannot be read apart: when they alone are over the limit the outputs go, naming the limit and the
    size; a cancelled or failed execution keeps its state and its reason."""
    many = [image_pb2.Detection(label="face", score=0.5)] * 2000
    finished = execution_pb2.ExecutionFinished(state=state, message=message)  # type: ignore[arg-type]
    finished.outputs.add(step_id="find", detections=many)
    finished.outputs.add(step_id="small", image=image_pb2.Image(data=b"x" * 100, media_type="image/png"))
    limit = finished.ByteSize() - 200  # over even with the image left out
    fit_result(finished, limit)
    assert finished.state == becomes and not finished.outputs
    assert finished.message.startswith(f"{message}; RESOURCE_EXHAUSTED" if message and becomes == state else "RESOURCE")
    assert "'find'" in finished.message.split("'small'")[0] and f"over the limit of {limit} bytes" in finished.message
    kept = execution_pb2.ExecutionFinished(state=execution_pb2.EXECUTION_STATE_SUCCEEDED)
    kept.outputs.add(step_id="find", detections=many)
    fit_result(kept, kept.ByteSize() + 1024)  # under the limit: delivered
    assert kept.state == execution_pb2.EXECUTION_STATE_SUCCEEDED and len(kept.outputs) == 1


def test_a_tools_error_message_is_kept_to_a_bounded_length() -> None:
    error = ToolCallError("INVALID_ARGUMENT", "x" * 5000)
    assert len(error.message) == MAX_TOOL_MESSAGE and error.message.endswith("…")
    assert ToolCallError("INTERNAL", "short").message == "short"


def test_a_message_limit_too_small_for_results_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="IMAGEFLOW_MAX_MESSAGE_BYTES must be at least 1048576"):
        Settings(max_message_bytes=64 * 1024)


class Forger(tool_service_pb2_grpc.ToolServiceServicer):
    """A third-party tool that sends back its image with another execution's blob_ref and a made-up data_bytes."""

    def __init__(self) -> None:
        self.ref = ""

    async def Describe(self, request: object, context: object) -> tool_service_pb2.DescribeResponse:
        port_in = tool_pb2.Port(name="image", type=tool_pb2.PORT_TYPE_IMAGE, required=True)
        port_out = tool_pb2.Port(name="image", type=tool_pb2.PORT_TYPE_IMAGE)
        tool = tool_pb2.Tool(name="forge", version="0.0.1", description_ja="偽装", description_en="forge",
                             params_schema=dict_to_struct({"type": "object"}), inputs=[port_in], outputs=[port_out])  # fmt: skip
        return tool_service_pb2.DescribeResponse(service="forger", tools=[tool])

    async def Process(
        self, request: tool_service_pb2.ProcessRequest, context: object
    ) -> tool_service_pb2.ProcessResponse:
        image = image_pb2.Image()
        image.CopyFrom(request.image)
        image.blob_ref, image.data_bytes = self.ref, 1
        return tool_service_pb2.ProcessResponse(image=image)


async def test_a_tool_cannot_name_another_executions_output_or_its_own_size(
    plane: ControlPlane, pipelines, registry
) -> None:  # type: ignore[no-untyped-def]
    """What a tool sends in `blob_ref` and `data_bytes` is dropped: the output is the tool's image, under this
    execution's own ref, inline, and never another execution's stored bytes."""
    earlier = [r.event async for r in pipelines.ExecutePipeline(pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=_outputs(50), inputs={"image": image_pb2.Image(data=CORNERS, media_type="image/x-raw-rgb8", width=2, height=2)}))]  # fmt: skip
    forger = Forger()
    forger.ref = earlier[-1].execution_finished.outputs[0].image.blob_ref
    server = await start_grpc_server(
        host="127.0.0.1", port=0, max_message_bytes=64 << 20, service_names=["imageflow.v1.ToolService"],
        register=lambda s: tool_service_pb2_grpc.add_ToolServiceServicer_to_server(forger, s),
    )  # fmt: skip
    try:
        await registry.RegisterTool(tool_registry_service_pb2.RegisterToolRequest(address=f"127.0.0.1:{server.port}"))
        pipeline = pipeline_pb2.Pipeline(name="forged")
        pipeline.steps.add(id="f", tool="forge")
        photo = sample("astronaut.jpg")
        request = pipeline_service_pb2.ExecutePipelineRequest(
            pipeline=pipeline, inputs={"image": image_pb2.Image(data=photo)}
        )
        streamed = [r.event async for r in pipelines.ExecutePipeline(request)]
        execution_id = streamed[0].execution_id
        got = await pipelines.GetExecution(pipeline_service_pb2.GetExecutionRequest(execution_id=execution_id))
        for image in (streamed[-1].execution_finished.outputs[0].image, got.execution.outputs[0].image):
            assert image.data == photo and not image.data_bytes
            assert image.blob_ref.startswith(f"{execution_id}/") and image.blob_ref != forger.ref
    finally:
        await registry.RemoveTool(tool_registry_service_pb2.RemoveToolRequest(name="forge"))
        await server.stop(0.1)
