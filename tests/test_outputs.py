"""Outputs apart from events: the event log (and so Kafka) holds references, never pixels; the client still gets its
outputs from the stream, GetExecution and WatchExecution while they are retained."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from imageflow.server.app import ControlPlane
from imageflow.v1 import execution_pb2, image_pb2, pipeline_pb2, pipeline_service_pb2

from tests.conftest import sample


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
