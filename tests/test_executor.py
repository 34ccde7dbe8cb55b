"""ExecutePipeline end to end over real gRPC: ordering, parallelism, retries, policies, cancel, resume, dedupe."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
import pytest_asyncio
from imageflow.common.serving import start_grpc_server
from imageflow.common.structs import dict_to_struct, struct_to_dict
from imageflow.server.adapters.storage import open_store
from imageflow.server.app import ControlPlane
from imageflow.server.domain.events import EventHub
from imageflow.server.domain.executor import Executor, ExecutorLimits
from imageflow.server.domain.store import ExecutionRow
from imageflow.v1 import (
    execution_pb2,
    image_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    tool_pb2,
    tool_registry_service_pb2,
    tool_service_pb2,
    tool_service_pb2_grpc,
)

from tests.conftest import sample

S = execution_pb2
ASTRONAUT = image_pb2.Image(data=sample("astronaut.jpg"))


class MisbehavingTools(tool_service_pb2_grpc.ToolServiceServicer):
    """A real ToolService whose tools misbehave on purpose: flaky, sleepy, broken (image passes through)."""

    def __init__(self, names: tuple[str, ...] = ("flaky", "sleepy", "broken")) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.names = names

    async def Describe(self, request: Any, context: Any) -> tool_service_pb2.DescribeResponse:
        schema = dict_to_struct(
            {"type": "object", "properties": {"key": {"type": "string"}, "fail_times": {"type": "integer"},
                                               "sleep_ms": {"type": "integer"}}, "additionalProperties": False}
        )  # fmt: skip
        port_in = tool_pb2.Port(name="image", type=tool_pb2.PORT_TYPE_IMAGE, required=True)
        port_out = tool_pb2.Port(name="image", type=tool_pb2.PORT_TYPE_IMAGE)
        tools = [
            tool_pb2.Tool(name=name, version="0.0.1", description_ja=name, description_en=name, params_schema=schema,
                          inputs=[port_in], outputs=[port_out])
            for name in self.names
        ]  # fmt: skip
        return tool_service_pb2.DescribeResponse(service="test-tools", tools=tools)

    async def Process(self, request: tool_service_pb2.ProcessRequest, context: Any) -> tool_service_pb2.ProcessResponse:
        params = struct_to_dict(request.params)
        key = params.get("key", "")
        self.calls[key] += 1
        if request.tool == "broken":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "broken on purpose")
        if request.tool in ("flaky", "doomed") and self.calls[key] <= params.get("fail_times", 0):
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"flaky failure {self.calls[key]}")
        await asyncio.sleep(params.get("sleep_ms", 0) / 1000)
        return tool_service_pb2.ProcessResponse(image=request.image)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def test_tools(plane: ControlPlane, registry) -> AsyncIterator[MisbehavingTools]:  # type: ignore[no-untyped-def]
    servicer = MisbehavingTools()
    server = await start_grpc_server(
        host="127.0.0.1", port=0, max_message_bytes=64 << 20, service_names=["imageflow.v1.ToolService"],
        register=lambda s: tool_service_pb2_grpc.add_ToolServiceServicer_to_server(servicer, s),
    )  # fmt: skip
    await registry.RegisterTool(tool_registry_service_pb2.RegisterToolRequest(address=f"127.0.0.1:{server.port}"))
    yield servicer
    await server.stop(0.1)


def build(*steps: dict[str, Any], policy: int = 0) -> pipeline_pb2.Pipeline:
    pipeline = pipeline_pb2.Pipeline(name="test", failure_policy=policy)  # type: ignore[arg-type]
    for step in steps:
        added = pipeline.steps.add(id=step["id"], tool=step["tool"], depends_on=step.get("after", []))
        added.params.update(step.get("params", {}))
        if "attempts" in step:
            added.policy.max_attempts = step["attempts"]
    return pipeline


async def run(pipelines, pipeline: pipeline_pb2.Pipeline, **kw: Any) -> list[execution_pb2.ExecutionEvent]:  # type: ignore[no-untyped-def]
    request = pipeline_service_pb2.ExecutePipelineRequest(pipeline=pipeline, inputs={"image": ASTRONAUT}, **kw)
    return [reply.event async for reply in pipelines.ExecutePipeline(request)]


def kinds(events: list[execution_pb2.ExecutionEvent], kind: str) -> list[Any]:
    return [getattr(e, kind) for e in events if e.WhichOneof("kind") == kind]


def finished(events: list[execution_pb2.ExecutionEvent]) -> execution_pb2.ExecutionFinished:
    assert events[-1].WhichOneof("kind") == "execution_finished"
    return events[-1].execution_finished


async def test_chain_events_are_ordered_and_outputs_encoded(pipelines) -> None:  # type: ignore[no-untyped-def]
    events = await run(
        pipelines,
        build(
            {"id": "small", "tool": "resize", "params": {"scale": 0.5}},
            {"id": "gray", "tool": "grayscale", "after": ["small"]},
            {"id": "soft", "tool": "blur", "params": {"radius": 2}, "after": ["gray"]},
        ),
    )
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[0].WhichOneof("kind") == "execution_started"
    assert [s.step_id for s in kinds(events, "step_succeeded")] == ["small", "gray", "soft"]
    done = finished(events)
    assert done.state == S.EXECUTION_STATE_SUCCEEDED
    (output,) = done.outputs
    assert output.step_id == "soft" and output.image.media_type == "image/jpeg"
    decoded = cv2.imdecode(np.frombuffer(output.image.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (256, 256)
    got = await pipelines.GetExecution(pipeline_service_pb2.GetExecutionRequest(execution_id=events[0].execution_id))
    assert got.execution.state == S.EXECUTION_STATE_SUCCEEDED
    assert {s.state for s in got.execution.steps} == {S.STEP_STATE_SUCCEEDED}


async def test_detect_then_blur_faces_outputs_detections(pipelines) -> None:  # type: ignore[no-untyped-def]
    generated = await pipelines.GeneratePipeline(
        pipeline_service_pb2.GeneratePipelineRequest(instruction="顔を検出して枠で描画して")
    )
    generated.pipeline.outputs.extend(["detect", "draw_boxes"])
    done = finished(await run(pipelines, generated.pipeline))
    assert done.state == S.EXECUTION_STATE_SUCCEEDED
    by_step = {o.step_id: o for o in done.outputs}
    assert [d.label for d in by_step["detect"].detections] == ["face"]
    assert by_step["draw_boxes"].image.media_type == "image/jpeg"


async def test_parallel_branches_overlap(pipelines, test_tools) -> None:  # type: ignore[no-untyped-def]
    events = await run(
        pipelines,
        build(
            {"id": "left", "tool": "sleepy", "params": {"sleep_ms": 400, "key": "p1"}},
            {"id": "right", "tool": "sleepy", "params": {"sleep_ms": 400, "key": "p2"}},
            {"id": "join", "tool": "grayscale", "after": ["left", "right"]},
        ),
    )
    order = [(e.WhichOneof("kind"), getattr(e, e.WhichOneof("kind")).step_id) for e in events[1:-1]]
    first_success = next(i for i, (kind, _) in enumerate(order) if kind == "step_succeeded")
    assert {("step_started", "left"), ("step_started", "right")} <= set(order[:first_success])
    assert finished(events).state == S.EXECUTION_STATE_SUCCEEDED


async def test_retries_then_success(pipelines, test_tools) -> None:  # type: ignore[no-untyped-def]
    events = await run(
        pipelines, build({"id": "f", "tool": "flaky", "params": {"fail_times": 2, "key": "r1"}, "attempts": 3})
    )
    retries = kinds(events, "step_retrying")
    assert [(r.attempt, r.code) for r in retries] == [(1, "UNAVAILABLE"), (2, "UNAVAILABLE")]
    assert finished(events).state == S.EXECUTION_STATE_SUCCEEDED


async def test_retries_exhausted_fail_honestly(pipelines, test_tools) -> None:  # type: ignore[no-untyped-def]
    events = await run(
        pipelines,
        build(
            {"id": "f", "tool": "flaky", "params": {"fail_times": 99, "key": "r2"}, "attempts": 2},
            {"id": "after", "tool": "grayscale", "after": ["f"]},
        ),
    )
    (failed,) = kinds(events, "step_failed")
    assert (failed.step_id, failed.code, failed.attempts) == ("f", "UNAVAILABLE", 2)
    assert [s.step_id for s in kinds(events, "step_skipped")] == ["after"]
    assert finished(events).state == S.EXECUTION_STATE_FAILED


async def test_invalid_argument_is_not_retried(pipelines, test_tools) -> None:  # type: ignore[no-untyped-def]
    events = await run(pipelines, build({"id": "b", "tool": "broken", "params": {"key": "r3"}, "attempts": 5}))
    assert kinds(events, "step_retrying") == []
    assert kinds(events, "step_failed")[0].message == "broken on purpose"
    assert test_tools.calls["r3"] == 1


@pytest.mark.parametrize(
    ("policy", "state", "slow_ok"),
    [(pipeline_pb2.FAILURE_POLICY_FAIL_FAST, S.EXECUTION_STATE_FAILED, False),
     (pipeline_pb2.FAILURE_POLICY_CONTINUE, S.EXECUTION_STATE_PARTIALLY_SUCCEEDED, True)],
)  # fmt: skip
async def test_failure_policies(pipelines, test_tools, policy: int, state: int, slow_ok: bool) -> None:  # type: ignore[no-untyped-def]
    events = await run(
        pipelines,
        build(
            {"id": "bad", "tool": "broken", "params": {"key": f"fp{policy}"}},
            {"id": "slow", "tool": "sleepy", "params": {"sleep_ms": 300, "key": f"fs{policy}"}},
            {"id": "tail", "tool": "grayscale", "after": ["bad"]},
            policy=policy,
        ),
    )
    done = finished(events)
    assert done.state == state
    assert ("slow" in {s.step_id for s in kinds(events, "step_succeeded")}) == slow_ok
    assert "tail" in {s.step_id for s in kinds(events, "step_skipped")}
    assert [o.step_id for o in done.outputs] == (["slow"] if slow_ok else [])


async def test_cancel_execution(pipelines, test_tools) -> None:  # type: ignore[no-untyped-def]
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=build({"id": "z", "tool": "sleepy", "params": {"sleep_ms": 5000, "key": "c1"}}),
        inputs={"image": ASTRONAUT},
    )
    stream = pipelines.ExecutePipeline(request)
    first = (await stream.read()).event
    reply = await pipelines.CancelExecution(
        pipeline_service_pb2.CancelExecutionRequest(execution_id=first.execution_id)
    )
    assert reply.execution.state == S.EXECUTION_STATE_CANCELLED
    rest = []
    while (reply := await stream.read()) is not grpc.aio.EOF:
        rest.append(reply.event)
    assert finished(rest).state == S.EXECUTION_STATE_CANCELLED


async def test_disconnect_then_watch_resumes_without_loss(pipelines, test_tools) -> None:  # type: ignore[no-untyped-def]
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=build(
            {"id": "a", "tool": "sleepy", "params": {"sleep_ms": 200, "key": "w1"}},
            {"id": "b", "tool": "sleepy", "params": {"sleep_ms": 200, "key": "w2"}, "after": ["a"]},
        ),
        inputs={"image": ASTRONAUT},
    )
    stream = pipelines.ExecutePipeline(request)
    seen = [(await stream.read()).event, (await stream.read()).event]
    stream.cancel()  # the client goes away; the execution must go on
    watched = [
        r.event
        async for r in pipelines.WatchExecution(
            pipeline_service_pb2.WatchExecutionRequest(execution_id=seen[0].execution_id, after_sequence=2)
        )
    ]
    assert [e.sequence for e in watched] == list(range(3, 3 + len(watched)))
    assert finished(watched).state == S.EXECUTION_STATE_SUCCEEDED
    replay = [
        r.event
        async for r in pipelines.WatchExecution(
            pipeline_service_pb2.WatchExecutionRequest(execution_id=seen[0].execution_id)
        )
    ]
    assert [e.sequence for e in replay] == list(range(1, 3 + len(watched)))


async def test_request_id_attaches_to_the_same_execution(pipelines, test_tools) -> None:  # type: ignore[no-untyped-def]
    pipeline = build({"id": "s", "tool": "sleepy", "params": {"sleep_ms": 100, "key": "d1"}})
    first, second = await asyncio.gather(
        run(pipelines, pipeline, request_id="req-dedupe-1"), run(pipelines, pipeline, request_id="req-dedupe-1")
    )
    assert first[0].execution_id == second[0].execution_id
    assert test_tools.calls["d1"] == 1


async def test_bad_requests_get_clear_codes(pipelines) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run(pipelines, pipeline_pb2.Pipeline())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request = pipeline_service_pb2.ExecutePipelineRequest(pipeline=build({"id": "g", "tool": "grayscale"}))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in pipelines.ExecutePipeline(request)]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in pipelines.WatchExecution(pipeline_service_pb2.WatchExecutionRequest(execution_id="ex_nope"))]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_corrupt_input_fails_the_step_not_the_server(pipelines) -> None:  # type: ignore[no-untyped-def]
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=build({"id": "g", "tool": "grayscale"}), inputs={"image": image_pb2.Image(data=b"garbage bytes")}
    )
    events = [r.event async for r in pipelines.ExecutePipeline(request)]
    (failed,) = kinds(events, "step_failed")
    assert failed.code == "INVALID_ARGUMENT" and "corrupt" in failed.message
    assert finished(events).state == S.EXECUTION_STATE_FAILED


async def test_8k_png_runs_through_three_steps(pipelines) -> None:  # type: ignore[no-untyped-def]
    base = cv2.imdecode(np.frombuffer(sample("astronaut.jpg"), np.uint8), cv2.IMREAD_COLOR)
    big = cv2.resize(base, (7680, 4320), interpolation=cv2.INTER_LINEAR)
    ok, png = cv2.imencode(".png", big, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=build(
            {"id": "flip", "tool": "flip", "params": {"direction": "horizontal"}},
            {"id": "sharp", "tool": "sharpen", "after": ["flip"]},
            {"id": "small", "tool": "resize", "params": {"scale": 0.25}, "after": ["sharp"]},
        ),
        inputs={"image": image_pb2.Image(data=png.tobytes(), media_type="image/png")},
    )
    events = [r.event async for r in pipelines.ExecutePipeline(request)]
    done = finished(events)
    assert done.state == S.EXECUTION_STATE_SUCCEEDED, done.message
    assert (done.outputs[0].image.width, done.outputs[0].image.height) == (1920, 1080)
    assert done.outputs[0].image.media_type == "image/png"


async def test_restart_marks_running_executions_interrupted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    store = await open_store(f"sqlite:///{tmp_path}/crash.db")
    await store.create_execution(ExecutionRow("ex_crashed", None, "pl", 1, "RUNNING", "", datetime.now(UTC), None, 3))
    executor = Executor(store, EventHub(store, []), invoker=None, allowed=lambda a: False, limits=ExecutorLimits())  # type: ignore[arg-type]
    assert await executor.recover() == ["ex_crashed"]
    row, events = await executor.get("ex_crashed")
    assert row.state == "FAILED" and "interrupted" in row.message
    assert events[-1].sequence == 4 and events[-1].execution_finished.state == S.EXECUTION_STATE_FAILED
    await store.close()


async def test_cancel_on_disconnect_when_asked(pipelines, test_tools) -> None:  # type: ignore[no-untyped-def]
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=build({"id": "z", "tool": "sleepy", "params": {"sleep_ms": 5000, "key": "cd1"}}),
        inputs={"image": ASTRONAUT},
        cancel_on_disconnect=True,
    )
    stream = pipelines.ExecutePipeline(request)
    execution_id = (await stream.read()).event.execution_id
    stream.cancel()
    watched = [
        r.event
        async for r in pipelines.WatchExecution(pipeline_service_pb2.WatchExecutionRequest(execution_id=execution_id))
    ]
    assert finished(watched).state == S.EXECUTION_STATE_CANCELLED


async def test_tool_that_dies_mid_run_fails_the_step_honestly(pipelines, registry) -> None:  # type: ignore[no-untyped-def]
    servicer = MisbehavingTools(names=("doomed",))
    server = await start_grpc_server(
        host="127.0.0.1", port=0, max_message_bytes=64 << 20, service_names=["imageflow.v1.ToolService"],
        register=lambda s: tool_service_pb2_grpc.add_ToolServiceServicer_to_server(servicer, s),
    )  # fmt: skip
    await registry.RegisterTool(tool_registry_service_pb2.RegisterToolRequest(address=f"127.0.0.1:{server.port}"))
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=build({"id": "d", "tool": "doomed", "params": {"sleep_ms": 3000, "key": "die"}, "attempts": 2}),
        inputs={"image": ASTRONAUT},
    )
    stream = pipelines.ExecutePipeline(request)
    events = []
    while (reply := await stream.read()) is not grpc.aio.EOF:
        events.append(reply.event)
        if reply.event.WhichOneof("kind") == "step_started":
            await server.server.stop(0)  # the tool process goes away mid-call
    (failed,) = kinds(events, "step_failed")
    assert failed.code == "UNAVAILABLE" and failed.attempts == 2
    assert len(kinds(events, "step_retrying")) == 1
    assert finished(events).state == S.EXECUTION_STATE_FAILED


async def test_recovery_ends_every_step_of_an_interrupted_execution(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    from imageflow.server.domain.store import EventWrite

    store = await open_store(f"sqlite:///{tmp_path}/crash2.db")
    await store.create_execution(ExecutionRow("ex_mid", None, "pl", 1, "RUNNING", "", datetime.now(UTC), None, 0))
    before = [
        S.ExecutionEvent(execution_started=S.ExecutionStarted(step_ids=["a", "b", "c"])),
        S.ExecutionEvent(step_started=S.StepStarted(step_id="a", attempt=1)),
        S.ExecutionEvent(step_succeeded=S.StepSucceeded(step_id="a")),
        S.ExecutionEvent(step_started=S.StepStarted(step_id="b", attempt=2)),
    ]
    for number, event in enumerate(before, start=1):
        event.sequence = number
    await store.append_events(
        "ex_mid", [EventWrite(e.sequence, e.SerializeToString(), "RUNNING", "", None) for e in before]
    )
    executor = Executor(store, EventHub(store, []), invoker=None, allowed=lambda a: False, limits=ExecutorLimits())  # type: ignore[arg-type]
    assert await executor.recover() == ["ex_mid"]
    _, events = await executor.get("ex_mid")
    await store.close()
    tail = [(e.WhichOneof("kind"), getattr(e, e.WhichOneof("kind"))) for e in events[4:]]
    assert [(kind, getattr(body, "step_id", "")) for kind, body in tail] == [
        ("step_failed", "b"), ("step_skipped", "c"), ("execution_finished", ""),
    ]  # fmt: skip
    assert tail[0][1].code == "ABORTED" and tail[0][1].attempts == 2 and "interrupted" in tail[1][1].reason
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5, 6, 7]


async def test_a_step_outlasts_its_tool_restarting(pipelines, registry) -> None:  # type: ignore[no-untyped-def]
    """The tool goes away and comes back on the same port ~1 s later: the step's retry waits for the reconnect
    (within its deadline) instead of failing against a channel still backing off."""
    from imageflow.testing.local import free_port

    port = free_port()

    async def serve() -> Any:
        servicer = MisbehavingTools(("phoenix",))
        return await start_grpc_server(
            host="127.0.0.1", port=port, max_message_bytes=64 << 20, service_names=["imageflow.v1.ToolService"],
            register=lambda s: tool_service_pb2_grpc.add_ToolServiceServicer_to_server(servicer, s),
        )  # fmt: skip

    server = await serve()
    await registry.RegisterTool(tool_registry_service_pb2.RegisterToolRequest(address=f"127.0.0.1:{port}"))
    assert finished(await run(pipelines, build({"id": "p", "tool": "phoenix"}))).state == S.EXECUTION_STATE_SUCCEEDED
    await server.stop(0)

    async def come_back() -> Any:
        await asyncio.sleep(1.0)
        return await serve()

    restarted = asyncio.create_task(come_back())
    events = await run(pipelines, build({"id": "p", "tool": "phoenix", "attempts": 3}))
    assert finished(events).state == S.EXECUTION_STATE_SUCCEEDED, [str(e) for e in events]
    await (await restarted).stop(0)


async def test_the_in_flight_limit_is_exact_under_concurrent_starts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """20 starts at once against a limit of 4 (the check and the registration are split by store awaits): exactly 4
    run, 16 are RESOURCE_EXHAUSTED naming the limit."""
    from imageflow.common.errors import ImageflowError
    from imageflow.server.domain.compiler import compile_pipeline
    from imageflow.server.domain.tool_records import RegisteredTool

    class Held:  # a deterministic seam: every call waits for the gate
        gate = asyncio.Event()

        async def process(self, *args: Any) -> Any:
            await self.gate.wait()
            raise AssertionError("not reached")

        def keeps_frames(self, address: str) -> bool:
            return False

    manifest = tool_pb2.Tool(
        name="hold", address="127.0.0.1:1", enabled=True, kind=tool_pb2.TOOL_KIND_SERVICE,
        params_schema=dict_to_struct({"type": "object"}),
        inputs=[tool_pb2.Port(name="image", type=tool_pb2.PORT_TYPE_IMAGE, required=True)],
        outputs=[tool_pb2.Port(name="image", type=tool_pb2.PORT_TYPE_IMAGE)],
    )  # fmt: skip
    compiled = compile_pipeline(build({"id": "h", "tool": "hold"}), {"hold": RegisteredTool.of(manifest)})
    store = await open_store(f"sqlite:///{tmp_path}/limit.db")
    executor = Executor(store, EventHub(store, []), Held(), lambda a: True, ExecutorLimits(executions=4))  # type: ignore[arg-type]
    results = await asyncio.gather(
        *(executor.start(compiled, {"image": ASTRONAUT}) for _ in range(20)), return_exceptions=True
    )
    started = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, ImageflowError)]
    assert len(started) == 4 and len(refused) == 16
    assert all(e.reason == "TOO_MANY_EXECUTIONS" and "the limit is 4" in e.message for e in refused)
    await executor.shutdown()
    await store.close()


def _seam_manifest(name: str) -> tool_pb2.Tool:
    return tool_pb2.Tool(
        name=name, address="127.0.0.1:1", enabled=True, kind=tool_pb2.TOOL_KIND_SERVICE,
        params_schema=dict_to_struct({"type": "object"}),
        inputs=[tool_pb2.Port(name="image", type=tool_pb2.PORT_TYPE_IMAGE, required=True)],
        outputs=[tool_pb2.Port(name="image", type=tool_pb2.PORT_TYPE_IMAGE)],
    )  # fmt: skip


@pytest.mark.parametrize("shape", ["lone step", "parallel branch"])
async def test_a_call_cancelled_under_a_step_fails_the_step_not_the_execution(tmp_path, shape: str) -> None:  # type: ignore[no-untyped-def]
    """grpc.aio raises CancelledError for a call cancelled on the client side (its channel closed when the tool was
    re-registered): nobody cancelled the step, so the step fails and the execution ends by its failure policy, whether
    the step ran alone in the execution's task or beside another."""
    from imageflow.server.domain.compiler import compile_pipeline
    from imageflow.server.domain.executor import ToolResult
    from imageflow.server.domain.tool_records import RegisteredTool

    class Cut:  # a deterministic seam: the step "cut" has its call cancelled under it
        async def process(self, address: str, request: Any, image: Any, timeout_s: float) -> Any:
            if request.tool == "cut":
                raise asyncio.CancelledError
            return ToolResult(image=image, header=image_pb2.Image(width=1, height=1, media_type="image/png"))

        def keeps_frames(self, address: str) -> bool:
            return False

    tools = {name: RegisteredTool.of(_seam_manifest(name)) for name in ("cut", "ok")}
    if shape == "lone step":
        steps = [{"id": "a", "tool": "cut"}, {"id": "b", "tool": "ok", "after": ["a"]}]
    else:
        steps = [{"id": "a", "tool": "ok"}, {"id": "b", "tool": "cut", "after": ["a"]}, {"id": "c", "tool": "ok", "after": ["a"]}]
    compiled = compile_pipeline(build(*steps), tools)
    store = await open_store(f"sqlite:///{tmp_path}/cut.db")
    executor = Executor(store, EventHub(store, []), Cut(), lambda a: True, ExecutorLimits())  # type: ignore[arg-type]
    execution_id, _ = await executor.start(compiled, {"image": ASTRONAUT})
    assert await executor.drain(30) == []  # it ended by itself
    row, events = await executor.get(execution_id)
    failed = kinds(events, "step_failed")
    cut = "a" if shape == "lone step" else "b"
    assert [(f.step_id, f.code) for f in failed] == [(cut, "CANCELLED")]
    assert "cancelled under the step" in failed[0].message
    assert row.state == "FAILED" and f"step '{cut}' failed" in row.message
    await store.close()


async def test_a_cancel_swallowed_inside_a_lone_step_still_cancels_the_execution(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A cancel delivered while the lone step runs in the execution's task, and turned into an ordinary failure
    somewhere under it (asyncio.wait_for can return a result a cancel raced with), still ends the execution CANCELLED,
    not FAILED by that step."""
    from imageflow.server.domain.compiler import compile_pipeline
    from imageflow.server.domain.executor import ToolCallError, ToolResult
    from imageflow.server.domain.tool_records import RegisteredTool

    entered = asyncio.Event()
    calls: list[str] = []

    class Swallow:
        async def process(self, address: str, request: Any, image: Any, timeout_s: float) -> Any:
            calls.append(request.tool)
            if request.tool == "ok":
                return ToolResult(image=image, header=image_pb2.Image(width=1, height=1, media_type="image/png"))
            entered.set()
            with contextlib.suppress(asyncio.CancelledError):  # swallowed: the step fails as an ordinary error
                await asyncio.Event().wait()
            raise ToolCallError("INVALID_ARGUMENT", "the call ended")

        def keeps_frames(self, address: str) -> bool:
            return False

    tools = {name: RegisteredTool.of(_seam_manifest(name)) for name in ("swallow", "ok")}
    compiled = compile_pipeline(build({"id": "a", "tool": "swallow"}, {"id": "b", "tool": "ok", "after": ["a"]}), tools)
    store = await open_store(f"sqlite:///{tmp_path}/swallow.db")
    executor = Executor(store, EventHub(store, []), Swallow(), lambda a: True, ExecutorLimits())  # type: ignore[arg-type]
    execution_id, _ = await executor.start(compiled, {"image": ASTRONAUT})
    await entered.wait()
    assert await executor.cancel(execution_id)
    assert await executor.drain(30) == []
    row, events = await executor.get(execution_id)
    assert row.state == "CANCELLED" and calls == ["swallow"]
    assert kinds(events, "step_failed")[0].step_id == "a"  # the step's own outcome is kept
    await store.close()
