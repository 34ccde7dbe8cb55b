"""Two real control-plane processes on one real PostgreSQL: execute on A, watch and cancel on B; kill A and B marks
A's execution interrupted within the lease time."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import grpc
import pytest_asyncio
from imageflow.common.serving import start_grpc_server
from imageflow.testing.local import free_port
from imageflow.v1 import (
    execution_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_registry_service_pb2,
    tool_registry_service_pb2_grpc,
    tool_service_pb2_grpc,
)

from tests.conftest import ROOT, PostgresCluster, aio_channel
from tests.test_executor import ASTRONAUT, MisbehavingTools, build

S = execution_pb2
LEASE_S = 2.0


def _replica(url: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ, "IMAGEFLOW_PORT": str(port), "IMAGEFLOW_DATABASE_URL": url, "IMAGEFLOW_EMBEDDED_TOOLS": "false",
        "IMAGEFLOW_REPLICA_LEASE_S": str(LEASE_S),
    }  # fmt: skip
    command = [sys.executable, "-c", "from imageflow.server.app import app; app()"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest_asyncio.fixture(loop_scope="session")
async def replicas() -> AsyncIterator[tuple[str, str, str, subprocess.Popen[bytes]]]:
    cluster = PostgresCluster()
    cluster.start()
    servicer = MisbehavingTools(("sleepy",))
    tools = await start_grpc_server(
        host="127.0.0.1", port=0, max_message_bytes=64 << 20, service_names=["imageflow.v1.ToolService"],
        register=lambda s: tool_service_pb2_grpc.add_ToolServiceServicer_to_server(servicer, s),
    )  # fmt: skip
    port_a, port_b = free_port(), free_port()
    a = _replica(cluster.url, port_a)
    async with aio_channel(f"127.0.0.1:{port_a}") as chan:  # A migrates the database first
        await asyncio.wait_for(chan.channel_ready(), 30)
    b = _replica(cluster.url, port_b)
    try:
        yield f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}", f"127.0.0.1:{tools.port}", a
    finally:
        for process in (a, b):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=20)
        await tools.stop(0.1)
        cluster.remove()


async def test_any_replica_watches_and_cancels_and_a_dead_replicas_runs_are_marked(replicas) -> None:  # type: ignore[no-untyped-def]
    address_a, address_b, tools, process_a = replicas
    async with aio_channel(address_a) as chan_a, aio_channel(address_b) as chan_b:
        await asyncio.wait_for(chan_b.channel_ready(), 30)
        await tool_registry_service_pb2_grpc.ToolRegistryServiceStub(chan_a).RegisterTool(
            tool_registry_service_pb2.RegisterToolRequest(address=tools)
        )
        on_a, on_b = (pipeline_service_pb2_grpc.PipelineServiceStub(c) for c in (chan_a, chan_b))

        async def start_long(key: str) -> tuple[str, grpc.aio.UnaryStreamCall]:  # type: ignore[type-arg]
            call = on_a.ExecutePipeline(pipeline_service_pb2.ExecutePipelineRequest(
                pipeline=build({"id": "nap", "tool": "sleepy", "params": {"sleep_ms": 30_000, "key": key}}),
                inputs={"image": ASTRONAUT},
            ))  # fmt: skip
            first = await call.read()
            while (await call.read()).event.WhichOneof("kind") != "step_started":
                pass
            return first.event.execution_id, call

        # watch and cancel on B what runs on A
        execution_id, call_a = await start_long("r1")
        watch_b = on_b.WatchExecution(pipeline_service_pb2.WatchExecutionRequest(execution_id=execution_id))
        assert (await watch_b.read()).event.WhichOneof("kind") == "execution_started"  # replayed from the store
        cancelled = await on_b.CancelExecution(pipeline_service_pb2.CancelExecutionRequest(execution_id=execution_id))
        assert cancelled.execution.state == S.EXECUTION_STATE_CANCELLED
        async with asyncio.timeout(20):
            while (reply := await watch_b.read()) is not grpc.aio.EOF:
                seen_on_b = reply.event
            while (reply := await call_a.read()) is not grpc.aio.EOF:
                seen_on_a = reply.event
        assert seen_on_b.execution_finished.state == S.EXECUTION_STATE_CANCELLED  # followed live across replicas
        assert seen_on_a.execution_finished.state == S.EXECUTION_STATE_CANCELLED

        # kill A: B marks its running execution interrupted within the lease time (plus a heartbeat)
        execution_id, _ = await start_long("r2")
        process_a.kill()
        killed = time.monotonic()
        async with asyncio.timeout(LEASE_S * 3 + 5):
            while True:
                got = await on_b.GetExecution(pipeline_service_pb2.GetExecutionRequest(execution_id=execution_id))
                if got.execution.state == S.EXECUTION_STATE_FAILED:
                    break
                await asyncio.sleep(0.2)
        assert time.monotonic() - killed <= LEASE_S + LEASE_S / 3 + 2
        assert "interrupted" in got.execution.message
        assert all(s.state in (S.STEP_STATE_FAILED, S.STEP_STATE_SKIPPED) for s in got.execution.steps)
