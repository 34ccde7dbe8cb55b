"""Outputs apart from events: the event log (and so Kafka) holds references, never pixels; the client still gets its
outputs from the stream, GetExecution and WatchExecution while they are retained."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from imageflow.common.structs import dict_to_struct
from imageflow.server.app import ControlPlane, start_control_plane
from imageflow.server.domain.executor import MAX_TOOL_MESSAGE, ToolCallError, _refuse_oversized
from imageflow.server.settings import Settings
from imageflow.v1 import execution_pb2, image_pb2, pipeline_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
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


async def test_a_result_too_large_for_one_message_fails_plainly_instead_of_being_lost(tmp_path: Path) -> None:
    """With IMAGEFLOW_MAX_MESSAGE_BYTES at 8 MiB, a raw 2000×2000 RGB output (12 MB) could be stored but never sent:
    the execution fails naming the limit, the size and the step, and the stream, GetExecution and a replay all
    deliver that. An output under the limit comes back as before."""
    limit = 8 * 1024 * 1024
    plane = await start_control_plane(
        Settings(host="127.0.0.1", port=0, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", max_message_bytes=limit)
    )
    tiny = image_pb2.Image(data=bytes(12), media_type="image/x-raw-rgb8", width=2, height=2)
    try:
        async with aio_channel(plane.address) as channel:
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            for side, fits in ((1000, True), (2000, False)):
                pipeline = pipeline_pb2.Pipeline(name="big")
                pipeline.steps.add(id="big", tool="resize", params=dict_to_struct({"width": side, "height": side}))
                request = pipeline_service_pb2.ExecutePipelineRequest(pipeline=pipeline, inputs={"image": tiny})
                streamed = [r.event async for r in stub.ExecutePipeline(request)]
                finished = streamed[-1].execution_finished
                execution_id = streamed[0].execution_id
                got = await stub.GetExecution(pipeline_service_pb2.GetExecutionRequest(execution_id=execution_id))
                replay = [r.event async for r in stub.WatchExecution(
                    pipeline_service_pb2.WatchExecutionRequest(execution_id=execution_id))]  # fmt: skip
                if fits:
                    assert finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
                    assert len(finished.outputs[0].image.data) == 1000 * 1000 * 3
                    assert got.execution.outputs[0].image.data == finished.outputs[0].image.data
                    continue
                assert finished.state == execution_pb2.EXECUTION_STATE_FAILED
                assert re.match(r"RESOURCE_EXHAUSTED: the result is 12000\d\d\d bytes", finished.message)
                assert f"over the limit of {limit - 64 * 1024} bytes" in finished.message
                assert "'big' 120000" in finished.message and "IMAGEFLOW_MAX_MESSAGE_BYTES" in finished.message
                assert not any(output.HasField("image") for output in finished.outputs)
                assert [e.step_succeeded.step_id for e in streamed if e.HasField("step_succeeded")] == ["big"]
                assert got.execution.state == execution_pb2.EXECUTION_STATE_FAILED
                assert got.execution.message == finished.message
                assert replay[-1].execution_finished == finished
    finally:
        await plane.stop(0.5)


@pytest.mark.parametrize(
    ("state", "message", "becomes"),
    [
        (execution_pb2.EXECUTION_STATE_SUCCEEDED, "", execution_pb2.EXECUTION_STATE_FAILED),
        (execution_pb2.EXECUTION_STATE_PARTIALLY_SUCCEEDED, "step 'b' failed", execution_pb2.EXECUTION_STATE_FAILED),
        (execution_pb2.EXECUTION_STATE_CANCELLED, "cancelled", execution_pb2.EXECUTION_STATE_CANCELLED),
        (execution_pb2.EXECUTION_STATE_FAILED, "step 'b' failed", execution_pb2.EXECUTION_STATE_FAILED),
    ],
)
def test_an_oversized_result_drops_its_outputs_images_and_detections_alike(
    state: int, message: str, becomes: int
) -> None:
    """Detections count as much as pixels; a cancelled or failed execution keeps its state and its reason."""
    many = [image_pb2.Detection(label="face", score=0.5)] * 2000
    finished = execution_pb2.ExecutionFinished(state=state, message=message)  # type: ignore[arg-type]
    finished.outputs.add(step_id="find", detections=many)
    finished.outputs.add(step_id="small", image=image_pb2.Image(data=b"x" * 100, media_type="image/png"))
    limit = finished.ByteSize() - 1  # measured without encoding the images, within a few bytes per output
    _refuse_oversized(finished, limit)
    assert finished.state == becomes and not finished.outputs
    assert finished.message.startswith(f"{message}; RESOURCE_EXHAUSTED" if message and becomes == state else "RESOURCE")
    assert "'find'" in finished.message.split("'small'")[0] and f"over the limit of {limit} bytes" in finished.message
    kept = execution_pb2.ExecutionFinished(state=execution_pb2.EXECUTION_STATE_SUCCEEDED)
    kept.outputs.add(step_id="find", detections=many)
    _refuse_oversized(kept, kept.ByteSize() + 1024)  # under the limit: delivered
    assert kept.state == execution_pb2.EXECUTION_STATE_SUCCEEDED and len(kept.outputs) == 1


def test_a_tools_error_message_is_kept_to_a_bounded_length() -> None:
    error = ToolCallError("INVALID_ARGUMENT", "x" * 5000)
    assert len(error.message) == MAX_TOOL_MESSAGE and error.message.endswith("…")
    assert ToolCallError("INTERNAL", "short").message == "short"


def test_a_message_limit_too_small_for_results_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="IMAGEFLOW_MAX_MESSAGE_BYTES must be at least 1048576"):
        Settings(max_message_bytes=64 * 1024)
