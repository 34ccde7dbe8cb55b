"""`make drills`: fault drills on real processes, printed as one table (longer than the tests that cover the same
faults in small: tests/test_storage.py, test_kafka.py, test_server.py, test_replicas.py, test_events.py).

1. PostgreSQL stopped for 10 s under 10 running executions with their streams open.
2. The Kafka broker killed and restarted during 100 executions, plus one execution with a ~20 MB output.
3. A control plane SIGKILLed with executions running, then restarted.
4. WatchExecution past the end of a running execution.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402
from imageflow.common.serving import start_grpc_server  # noqa: E402
from imageflow.testing.local import free_port  # noqa: E402
from imageflow.v1 import (  # noqa: E402
    execution_pb2,
    image_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_registry_service_pb2,
    tool_registry_service_pb2_grpc,
    tool_service_pb2_grpc,
)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.conftest import PostgresCluster, aio_channel, sample  # noqa: E402
from tests.test_executor import MisbehavingTools, build  # noqa: E402
from tests.test_kafka import TOPIC, _create_topic, _start_broker  # noqa: E402

S = execution_pb2
IMAGE = image_pb2.Image(data=sample("chelsea.jpg"))
console = Console()


def server(env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-c", "from imageflow.server.app import app; app()"]
    return subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def stop(plane: subprocess.Popen[bytes]) -> None:
    plane.send_signal(signal.SIGTERM)
    plane.wait(timeout=30)


async def register(channel: grpc.aio.Channel, tools: Any) -> None:
    """Register the sleepy tool service with the control plane behind `channel`."""
    await tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel).RegisterTool(
        tool_registry_service_pb2.RegisterToolRequest(address=f"127.0.0.1:{tools.port}")
    )


async def ready(address: str) -> None:
    async with aio_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 60)


async def sleepy_tools() -> Any:
    servicer = MisbehavingTools(("sleepy",))
    return await start_grpc_server(
        host="127.0.0.1", port=0, max_message_bytes=64 << 20, service_names=["imageflow.v1.ToolService"],
        register=lambda s: tool_service_pb2_grpc.add_ToolServiceServicer_to_server(servicer, s),
    )  # fmt: skip


async def stream_to_end(call: Any, limit_s: float) -> tuple[str, int]:
    """('finished STATE' | 'hung' | 'CODE'), events seen."""
    seen = 0
    try:
        async with asyncio.timeout(limit_s):
            async for reply in call:
                seen += 1
                if reply.event.WhichOneof("kind") == "execution_finished":
                    return S.ExecutionState.Name(reply.event.execution_finished.state), seen
    except TimeoutError:
        return "hung", seen
    except grpc.aio.AioRpcError as error:
        return error.code().name, seen
    return "ended without a finished event", seen


async def drill_postgres_outage(rows: list[tuple[str, str, str]]) -> None:
    cluster = PostgresCluster()
    cluster.start()
    tools = await sleepy_tools()
    port = free_port()
    plane = server(
        {"IMAGEFLOW_PORT": str(port), "IMAGEFLOW_DATABASE_URL": cluster.url, "IMAGEFLOW_EMBEDDED_TOOLS": "false"}
    )
    address = f"127.0.0.1:{port}"
    try:
        await ready(address)
        async with aio_channel(address) as channel:
            await register(channel, tools)
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            calls = [
                stub.ExecutePipeline(pipeline_service_pb2.ExecutePipelineRequest(
                    pipeline=build({"id": "nap", "tool": "sleepy", "params": {"sleep_ms": 3000, "key": f"pg{i}"}}),
                    inputs={"image": IMAGE}))
                for i in range(10)
            ]  # fmt: skip
            await asyncio.sleep(1.0)
            await asyncio.to_thread(cluster.stop, "fast")
            codes: dict[str, int] = {}
            outage_end = time.monotonic() + 10
            while time.monotonic() < outage_end:  # reads during the outage
                try:
                    await stub.ListPipelines(pipeline_service_pb2.ListPipelinesRequest(), timeout=5)
                    codes["OK"] = codes.get("OK", 0) + 1
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] = codes.get(error.code().name, 0) + 1
                await asyncio.sleep(0.5)
            await asyncio.to_thread(cluster.start)
            ends = await asyncio.gather(*(stream_to_end(c, 60) for c in calls))
            await asyncio.sleep(1)
        finished = sum(1 for state, _ in ends if state == "EXECUTION_STATE_SUCCEEDED")
        hung = sum(1 for state, _ in ends if state == "hung")
        import asyncpg

        connection = await asyncpg.connect(cluster.url)
        try:
            left = await connection.fetchval("SELECT count(*) FROM executions WHERE state IN ('PENDING', 'RUNNING')")
        finally:
            await connection.close()
        ok = set(codes) <= {"UNAVAILABLE", "OK"} and hung == 0 and left == 0 and finished == 10
        rows.append(("PostgreSQL stopped 10 s, 10 executions running",
                     f"reads during the outage: {codes}; streams: {finished}/10 SUCCEEDED, {hung} hung; "
                     f"left RUNNING: {left}", "pass" if ok else "FAIL"))  # fmt: skip
    finally:
        stop(plane)
        await tools.stop(0.1)
        cluster.remove()


async def drill_kafka_restart(rows: list[tuple[str, str, str]], tmp: Path) -> None:
    kafka_port, port = free_port(), free_port()
    bootstrap, address = f"127.0.0.1:{kafka_port}", f"127.0.0.1:{port}"
    broker = _start_broker(kafka_port)
    await _create_topic(bootstrap)
    plane = server({"IMAGEFLOW_PORT": str(port), "IMAGEFLOW_DATABASE_URL": f"sqlite:///{tmp / 'kafka.db'}",
                    "IMAGEFLOW_KAFKA_BOOTSTRAP": bootstrap})  # fmt: skip
    pipeline = pipeline_pb2.Pipeline(name="kafka drill")
    pipeline.steps.add(id="gray", tool="grayscale")
    noise = np.random.default_rng(0).integers(0, 256, (2600, 2600, 3), dtype=np.uint8)
    big_png = cv2.imencode(".png", noise)[1].tobytes()
    big = pipeline_pb2.Pipeline(name="big output")
    big.steps.add(id="flip", tool="flip").params.update({"direction": "horizontal"})
    ids: list[str] = []
    counts: dict[str, int] = {}
    try:
        await ready(address)
        async with aio_channel(address) as channel:
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            for i in range(100):
                if i == 30:
                    broker.terminate()
                    broker.wait(timeout=10)
                if i == 70:
                    broker = _start_broker(kafka_port)
                    await _create_topic(bootstrap)
                request = pipeline_service_pb2.ExecutePipelineRequest(pipeline=pipeline, inputs={"image": IMAGE})
                got = [r.event async for r in stub.ExecutePipeline(request)]
                ids.append(got[0].execution_id)
                counts[got[0].execution_id] = len(got)
            request = pipeline_service_pb2.ExecutePipelineRequest(
                pipeline=big, inputs={"image": image_pb2.Image(data=big_png)}
            )
            got = [r.event async for r in stub.ExecutePipeline(request)]
            output_bytes = len(got[-1].execution_finished.outputs[0].image.data)
            ids.append(got[0].execution_id)
            counts[got[0].execution_id] = len(got)
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        received: list[execution_pb2.ExecutionEvent] = []
        try:
            partition = TopicPartition(TOPIC, 0)
            consumer.assign([partition])
            await consumer.seek_to_beginning(partition)
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < 15:
                batch = await consumer.getmany(partition, timeout_ms=500)
                records = batch.get(partition, [])
                if records:
                    quiet_since = time.monotonic()
                received += [execution_pb2.ExecutionEvent.FromString(r.value) for r in records]
        finally:
            await consumer.stop()
        later = set(ids[30:])  # executions 31-101: run while the broker was down, or after it came back
        delivered = [e for e in received if e.execution_id in later]
        expected = sum(counts[i] for i in later)
        in_order = all(
            [e.sequence for e in delivered if e.execution_id == i] == list(range(1, counts[i] + 1)) for i in later
        )
        big_finished = [
            e for e in delivered if e.execution_id == ids[-1] and e.WhichOneof("kind") == "execution_finished"
        ]
        big_size = big_finished[0].ByteSize() if big_finished else 0
        ok = len(delivered) == expected and in_order and bool(big_finished) and big_size < 4096
        rows.append(("Kafka broker killed at execution 30, back at 70, of 100 (+1 with a ~20 MB output)",
                     f"executions 31-101 made {expected} events: {len(delivered)} delivered after the restart, "
                     f"in order per execution: {in_order}, 0 lost (1-30 went to the killed broker, which kept them "
                     f"in memory); the {output_bytes / 2**20:.1f} MiB output's finished event on Kafka: {big_size} "
                     f"bytes (a reference)", "pass" if ok else "FAIL"))  # fmt: skip
    finally:
        stop(plane)
        broker.terminate()
        broker.wait(timeout=10)


async def drill_sigkill(rows: list[tuple[str, str, str]], tmp: Path) -> None:
    tools = await sleepy_tools()
    port = free_port()
    env = {"IMAGEFLOW_PORT": str(port), "IMAGEFLOW_DATABASE_URL": f"sqlite:///{tmp / 'kill.db'}",
           "IMAGEFLOW_EMBEDDED_TOOLS": "false", "IMAGEFLOW_REPLICA_LEASE_S": "2"}  # fmt: skip
    address = f"127.0.0.1:{port}"
    plane = server(env)
    try:
        await ready(address)
        async with aio_channel(address) as channel:
            await register(channel, tools)
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            ids = []
            for i in range(5):
                call = stub.ExecutePipeline(pipeline_service_pb2.ExecutePipelineRequest(
                    pipeline=build({"id": "a", "tool": "sleepy", "params": {"sleep_ms": 20_000, "key": f"k{i}"}},
                                   {"id": "b", "tool": "sleepy", "after": ["a"]}),
                    inputs={"image": IMAGE}))  # fmt: skip
                ids.append((await call.read()).event.execution_id)
            await asyncio.sleep(0.5)
        plane.kill()
        plane.wait(timeout=10)
        plane = server(env)
        await ready(address)
        await asyncio.sleep(4)  # the lease (2 s) runs out, a heartbeat marks them
        async with aio_channel(address) as channel:
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            got = [
                (await stub.GetExecution(pipeline_service_pb2.GetExecutionRequest(execution_id=i))).execution
                for i in ids
            ]
        failed = sum(1 for e in got if e.state == S.EXECUTION_STATE_FAILED)
        terminal = sum(1 for e in got for s in e.steps if s.state in (S.STEP_STATE_FAILED, S.STEP_STATE_SKIPPED))
        steps = sum(len(e.steps) for e in got)
        ok = failed == 5 and terminal == steps
        rows.append(("SIGKILL with 5 executions running, restart", f"{failed}/5 FAILED (interrupted), "
                     f"{terminal}/{steps} steps terminal", "pass" if ok else "FAIL"))  # fmt: skip
    finally:
        stop(plane)
        await tools.stop(0.1)


async def drill_watch_past_end(rows: list[tuple[str, str, str]], tmp: Path) -> None:
    tools = await sleepy_tools()
    port = free_port()
    plane = server({"IMAGEFLOW_PORT": str(port), "IMAGEFLOW_DATABASE_URL": f"sqlite:///{tmp / 'watch.db'}",
                    "IMAGEFLOW_EMBEDDED_TOOLS": "false"})  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        await ready(address)
        async with aio_channel(address) as channel:
            await register(channel, tools)
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            call = stub.ExecutePipeline(pipeline_service_pb2.ExecutePipelineRequest(
                pipeline=build({"id": "a", "tool": "sleepy", "params": {"sleep_ms": 2000, "key": "w"}}),
                inputs={"image": IMAGE}))  # fmt: skip
            execution_id = (await call.read()).event.execution_id
            began = time.monotonic()
            watch = stub.WatchExecution(
                pipeline_service_pb2.WatchExecutionRequest(execution_id=execution_id, after_sequence=1000)
            )
            outcome, seen = await stream_to_end(watch, 30)
            took = time.monotonic() - began
        ok = outcome == "ended without a finished event" and took < 10
        rows.append(("WatchExecution(after_sequence=1000) on a running execution",
                     f"returned {took:.1f} s later, when it finished ({seen} events)", "pass" if ok else "FAIL"))  # fmt: skip
    finally:
        stop(plane)
        await tools.stop(0.1)


async def main() -> int:
    import tempfile

    rows: list[tuple[str, str, str]] = []
    drills: list[Callable[..., Any]] = [drill_postgres_outage, drill_kafka_restart, drill_sigkill, drill_watch_past_end]
    with tempfile.TemporaryDirectory() as tmp:
        for drill in drills:
            console.print(f"running {drill.__name__} …")
            try:
                if drill is drill_postgres_outage:
                    await drill(rows)
                else:
                    await drill(rows, Path(tmp))
            except Exception as error:  # noqa: BLE001 - one broken drill must not hide the others
                rows.append((drill.__name__, f"{type(error).__name__}: {error}", "FAIL"))
    table = Table(title="fault drills (real processes)")
    for column in ("drill", "what happened", "result"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return 0 if all(result == "pass" for _, _, result in rows) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
