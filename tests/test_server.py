"""The control plane as a user meets it: health, reflection, error mapping, graceful shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from imageflow.common.serving import loop_factory, loop_name, start_grpc_server
from imageflow.server.app import ControlPlane
from imageflow.testing.local import free_port
from imageflow.v1 import (
    execution_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_registry_service_pb2,
    tool_registry_service_pb2_grpc,
    tool_service_pb2_grpc,
)

from tests.conftest import ROOT, aio_channel

STATUS_DETAILS_KEY = "grpc-status-details-bin"  # the wire name, read here without the server's helpers


def details_of(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status carried in the trailers."""
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    raise AssertionError("no status details in trailers")


async def test_health_is_serving(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "imageflow.v1.PipelineService", "imageflow.v1.ToolRegistryService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for reply in stub.ServerReflectionInfo(requests()):
        names |= {s.name for s in reply.list_services_response.service}
    assert {"imageflow.v1.PipelineService", "imageflow.v1.ToolRegistryService", "grpc.health.v1.Health"} <= names


async def test_not_found_has_error_info(pipelines) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pipelines.GetPipeline(pipeline_service_pb2.GetPipelineRequest(pipeline_id="pl_missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    status = details_of(caught.value)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "PIPELINE_NOT_FOUND"


async def test_invalid_pipeline_lists_field_violations(pipelines) -> None:  # type: ignore[no-untyped-def]
    pipeline = pipeline_pb2.Pipeline(
        steps=[pipeline_pb2.Step(id="a", tool="resize"), pipeline_pb2.Step(id="b", tool="no_such_tool")]
    )
    pipeline.steps[0].params.update({"scale": -1})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pipelines.ValidatePipeline(pipeline_service_pb2.ValidatePipelineRequest(pipeline=pipeline))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = details_of(caught.value)
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details)
    fields = {v.field for v in bad.field_violations}
    assert "steps[0].params.scale" in fields
    assert "steps[1].tool" in fields


async def test_triton_import_from_nowhere_is_unavailable(registry) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.ImportTritonModels(
            tool_registry_service_pb2.ImportTritonModelsRequest(address=f"127.0.0.1:{free_port()}")
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry.ImportTritonModels(tool_registry_service_pb2.ImportTritonModelsRequest(address="not an address"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_exception_becomes_generic_internal(plane: ControlPlane, pipelines, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async def explode(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("secret detail /var/lib/something")

    monkeypatch.setattr(plane.store, "list_pipelines", explode)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pipelines.ListPipelines(pipeline_service_pb2.ListPipelinesRequest())
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (caught.value.details() or "")


def _server_command(*prelude: str) -> list[str]:
    return [sys.executable, "-c", "; ".join([*prelude, "from imageflow.server.app import app", "app()"])]


@pytest.mark.parametrize(("setting", "running"), [(None, "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_the_server_runs_on_the_event_loop_it_is_set_to(tmp_path, setting, running) -> None:  # type: ignore[no-untyped-def]
    """uvloop where it is installed (the default, auto), asyncio's own when asked: an execution through the embedded
    tools runs to the end either way, and the startup log says which loop it is."""
    from tests.test_executor import ASTRONAUT, build

    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "IMAGEFLOW_EVENT_LOOP"},
        "IMAGEFLOW_PORT": str(port), "IMAGEFLOW_HOST": "127.0.0.1", "IMAGEFLOW_LOG_LEVEL": "info",
        "IMAGEFLOW_DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite", "IMAGEFLOW_EMBEDDED_TOOLS": "true",
        **({"IMAGEFLOW_EVENT_LOOP": setting} if setting else {}),
    }  # fmt: skip
    with (tmp_path / "server.log").open("w") as log_file:
        server = subprocess.Popen(_server_command(), cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=60)
                stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
                pipeline = build({"id": "small", "tool": "resize", "params": {"scale": 0.5}},
                                 {"id": "gray", "tool": "grayscale", "after": ["small"]})  # fmt: skip
                request = pipeline_service_pb2.ExecutePipelineRequest(pipeline=pipeline, inputs={"image": ASTRONAUT})
                events = [reply.event for reply in stub.ExecutePipeline(request, timeout=60)]
            finished = events[-1].execution_finished
            assert finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED, finished.message
            assert [o.step_id for o in finished.outputs] == ["gray"] and finished.outputs[0].image.data
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=10) == 0
        finally:
            if server.poll() is None:
                server.kill()
    assert f"event loop: {running})" in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"IMAGEFLOW_EVENT_LOOP": "tornado"}, ["event_loop", "'auto', 'uvloop' or 'asyncio'", "tornado"]),
        ({"IMAGEFLOW_PLANNER_MODE": "magic"}, ["planner_mode", "'llm' or 'hybrid'", "magic"]),
        ({"IMAGEFLOW_PORT": "eighty"}, ["port", "eighty"]),
        ({"IMAGEFLOW_LOG_LEVEL": "verbose"}, ["log_level", "'verbose' is not one of debug, info, warning", "critical"]),
    ],
)
def test_an_invalid_setting_refuses_to_start_naming_it(env, says, tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run(
        _server_command(), cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "IMAGEFLOW_EMBEDDED_TOOLS": "false", "IMAGEFLOW_DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
             **env},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("imageflow-server: invalid settings:"), done.stderr
    assert all(word in done.stderr for word in says), done.stderr
    assert "Traceback" not in done.stderr


def test_uvloop_asked_for_where_it_is_not_installed_refuses_to_start(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run(
        _server_command("import sys", "sys.modules['uvloop'] = None"),  # what an import of a missing package meets
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "IMAGEFLOW_EMBEDDED_TOOLS": "false", "IMAGEFLOW_DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
             "IMAGEFLOW_EVENT_LOOP": "uvloop"},
    )  # fmt: skip
    assert done.returncode == 2
    assert "IMAGEFLOW_EVENT_LOOP: event loop 'uvloop' is not installed here" in done.stderr, done.stderr


def test_loop_factory_takes_uvloop_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvloop

    assert loop_factory("asyncio") is None
    assert loop_factory("auto") is uvloop.new_event_loop and loop_factory("uvloop") is uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        assert runner.run(_running_loop_name()) == "uvloop"
    with asyncio.Runner(loop_factory=loop_factory("asyncio")) as runner:
        assert runner.run(_running_loop_name()) == "asyncio"
    with pytest.raises(ValueError, match="event loop 'libev' is not one of auto, uvloop, asyncio"):
        loop_factory("libev")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # not installed: auto falls back, uvloop is refused
    assert loop_factory("auto") is None
    with pytest.raises(ValueError, match="'uvloop' is not installed here"):
        loop_factory("uvloop")


async def _running_loop_name() -> str:
    return loop_name(asyncio.get_running_loop())


def test_sigterm_drains_and_exits_zero(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    env = {
        **os.environ,
        "IMAGEFLOW_PORT": str(port),
        "IMAGEFLOW_HOST": "127.0.0.1",
        "IMAGEFLOW_DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite",
        "IMAGEFLOW_EMBEDDED_TOOLS": "false",
    }
    server = subprocess.Popen(
        _server_command(),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
        assert time.monotonic() - started < 10
    finally:
        if server.poll() is None:
            server.kill()


async def test_invalid_utf8_in_a_step_id_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    step = b"\x0a\x02\xff\xfe"  # Step{id: <invalid UTF-8>}
    pipeline = b"\x22" + bytes([len(step)]) + step  # Pipeline{steps: [step]}
    request = b"\x0a" + bytes([len(pipeline)]) + pipeline  # SavePipelineRequest{pipeline}
    for method in ("SavePipeline", "ExecutePipeline"):
        path = f"/imageflow.v1.PipelineService/{method}"
        if method == "SavePipeline":
            call = channel.unary_unary(path, request_serializer=lambda x: x, response_deserializer=lambda x: x)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(request)
        else:
            stream = channel.unary_stream(path, request_serializer=lambda x: x, response_deserializer=lambda x: x)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                [reply async for reply in stream(b"\x12" + bytes([len(pipeline)]) + pipeline)]
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in (caught.value.details() or "")


async def test_sigterm_finishes_short_runs_and_interrupts_long_ones(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.test_executor import ASTRONAUT, MisbehavingTools, build

    servicer = MisbehavingTools(("sleepy",))
    tools = await start_grpc_server(
        host="127.0.0.1", port=0, max_message_bytes=64 << 20, service_names=["imageflow.v1.ToolService"],
        register=lambda s: tool_service_pb2_grpc.add_ToolServiceServicer_to_server(servicer, s),
    )  # fmt: skip
    port = free_port()
    env = {
        **os.environ, "IMAGEFLOW_PORT": str(port), "IMAGEFLOW_DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite",
        "IMAGEFLOW_EMBEDDED_TOOLS": "false", "IMAGEFLOW_GRACE_PERIOD_S": "2",
    }  # fmt: skip
    server = subprocess.Popen(
        _server_command(), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with aio_channel(f"127.0.0.1:{port}") as chan:
            await asyncio.wait_for(chan.channel_ready(), 30)
            registry = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(chan)
            await registry.RegisterTool(
                tool_registry_service_pb2.RegisterToolRequest(address=f"127.0.0.1:{tools.port}")
            )
            pipelines = pipeline_service_pb2_grpc.PipelineServiceStub(chan)

            def execute(sleep_ms: int, key: str):  # type: ignore[no-untyped-def]
                pipeline = build({"id": "nap", "tool": "sleepy", "params": {"sleep_ms": sleep_ms, "key": key}})
                return pipelines.ExecutePipeline(
                    pipeline_service_pb2.ExecutePipelineRequest(pipeline=pipeline, inputs={"image": ASTRONAUT})
                )

            short, long = execute(800, "short"), execute(30_000, "long")
            for call in (short, long):  # both running: started and their step started
                while (await call.read()).event.WhichOneof("kind") != "step_started":
                    pass
            server.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await execute(10, "late").read()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            ends = {}
            for name, call in (("short", short), ("long", long)):
                while (reply := await call.read()) is not grpc.aio.EOF:
                    ends[name] = reply.event
            assert ends["short"].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
            assert ends["long"].execution_finished.state == execution_pb2.EXECUTION_STATE_FAILED
            assert "shut down (SIGTERM)" in ends["long"].execution_finished.message
        assert await asyncio.to_thread(server.wait, 15) == 0
        long_id = ends["long"].execution_id
        server = subprocess.Popen(
            _server_command(), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        async with aio_channel(f"127.0.0.1:{port}") as chan:
            await asyncio.wait_for(chan.channel_ready(), 30)
            got = await pipeline_service_pb2_grpc.PipelineServiceStub(chan).GetExecution(
                pipeline_service_pb2.GetExecutionRequest(execution_id=long_id)
            )
        assert got.execution.state == execution_pb2.EXECUTION_STATE_FAILED  # stored as interrupted, not CANCELLED
        assert all(
            s.state in (execution_pb2.STEP_STATE_FAILED, execution_pb2.STEP_STATE_SKIPPED) for s in got.execution.steps
        )
    finally:
        if server.poll() is None:
            server.kill()
        await tools.stop(0.1)
