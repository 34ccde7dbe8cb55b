"""Sibling steps on one frame in one call: ToolService.ProcessBranches answers each branch what ProcessChain answers
for it, a failing branch is data for that branch alone, and the control plane's invoker gathers the calls that start
together on the same large frame to one service into one such call, falling back to one call each for services
that predate the method, without changing any step's result or status."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from imageflow.common.structs import dict_to_struct
from imageflow.server.adapters import transport
from imageflow.server.adapters.storage import open_store
from imageflow.server.adapters.transport import ChannelPool, GrpcToolInvoker
from imageflow.server.app import start_control_plane
from imageflow.server.domain.executor import ToolCallError, ToolResult
from imageflow.server.domain.registry import Registry
from imageflow.server.settings import Settings
from imageflow.tools.plane import ToolPlane
from imageflow.tools.server import ToolServer
from imageflow.v1 import execution_pb2, image_pb2, tool_pb2, tool_service_pb2, tool_service_pb2_grpc

from tests.conftest import Calls, aio_channel, sample
from tests.test_chains import manifest, run
from tests.test_pieces import OnlyUnary, start_old_build
from tests.test_shared_memory import objects

MIB = 1024 * 1024
Chain = tool_service_pb2.ProcessChainRequest


def raw_frame(width: int = 1024, height: int = 576) -> image_pb2.Image:
    """A raw RGB frame of a photo (1.7 MB at the default size: over the invoker's gathering threshold)."""
    bgr = cv2.resize(cv2.imdecode(np.frombuffer(sample("astronaut.jpg"), np.uint8), cv2.IMREAD_COLOR), (width, height))
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return image_pb2.Image(data=rgb.tobytes(), media_type="image/x-raw-rgb8", width=width, height=height)


def chain(*tools: tuple[str, dict[str, Any]], output: str = "", omit: bool = False) -> Chain:
    return Chain(
        steps=[tool_service_pb2.ChainStep(tool=t, params=dict_to_struct(p)) for t, p in tools],
        output_media_type=output,
        omit_output_image=omit,
    )


BRANCHES = [
    chain(("blur", {"radius": 3}), output="image/x-raw-gray8"),
    chain(("grayscale", {}), ("sharpen", {}), output="image/png"),
    chain(("blur", {"radius": 4}), omit=True),
]


def without_durations(response: tool_service_pb2.ProcessChainResponse) -> tool_service_pb2.ProcessChainResponse:
    for result in response.results:
        result.ClearField("duration")
    return response


async def _branches(address: str, request: tool_service_pb2.ProcessBranchesRequest) -> dict[int, Any]:
    async with aio_channel(address) as channel:
        stub = tool_service_pb2_grpc.ToolServiceStub(channel)
        return {reply.branch_index: reply.response async for reply in stub.ProcessBranches(request)}


# --- ToolService.ProcessBranches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("registered", ["spliced", "generated"])
async def test_each_branch_answers_what_its_chain_answers_alone(
    filter_service: ToolServer, counted_filter: tuple[str, Calls], registered: str
) -> None:
    address = filter_service.address if registered == "spliced" else counted_filter[0]
    image = raw_frame(320, 180)
    answers = await _branches(address, tool_service_pb2.ProcessBranchesRequest(image=image, branches=BRANCHES))
    assert sorted(answers) == [0, 1, 2]
    async with aio_channel(address) as channel:
        stub = tool_service_pb2_grpc.ToolServiceStub(channel)
        for index, branch in enumerate(BRANCHES):
            alone = Chain()
            alone.CopyFrom(branch)
            alone.image.CopyFrom(image)
            expected = await stub.ProcessChain(alone)
            assert without_durations(answers[index]) == without_durations(expected), index
    assert answers[0].image.media_type == "image/x-raw-gray8" and len(answers[0].image.data) == 320 * 180
    assert answers[1].image.data.startswith(b"\x89PNG")
    assert not answers[2].image.data and answers[2].image.width == 320  # omitted: its type and size, no pixels


async def test_a_failing_branch_is_data_and_the_others_run_on(filter_service: ToolServer) -> None:
    request = tool_service_pb2.ProcessBranchesRequest(
        image=raw_frame(64, 48),
        branches=[chain(("flip", {})), chain(("grayscale", {}), ("blur", {"radius": -5})), chain(("grayscale", {}))],
    )
    answers = await _branches(filter_service.address, request)
    not_served, bad_params, fine = answers[0], answers[1], answers[2]
    assert not_served.failure.code == "INVALID_ARGUMENT" and not_served.failure.step_index == 0
    assert "flip" in not_served.failure.message and not not_served.results
    assert bad_params.failure.code == "INVALID_ARGUMENT" and bad_params.failure.step_index == 1
    assert len(bad_params.results) == 1 and bad_params.image.media_type == "image/x-raw-gray8"  # the last good image
    assert not fine.HasField("failure") and len(fine.results) == 1 and fine.image.data


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (tool_service_pb2.ProcessBranchesRequest(image=image_pb2.Image(data=b"x")), "BRANCHES_EMPTY"),
        (
            tool_service_pb2.ProcessBranchesRequest(
                image=image_pb2.Image(data=b"x"),
                branches=[Chain(image=image_pb2.Image(data=b"y"), steps=[tool_service_pb2.ChainStep(tool="blur")])],
            ),
            "BRANCH_IMAGE",
        ),
    ],
    ids=["no-branches", "a-branch-with-its-own-image"],
)
async def test_a_branches_call_that_cannot_run_is_invalid_argument(
    filter_service: ToolServer, request_: tool_service_pb2.ProcessBranchesRequest, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _branches(filter_service.address, request_)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in str(refused.value.trailing_metadata())


# --- the control plane's invoker -----------------------------------------------------------------------------------


def _requests() -> tuple[tool_service_pb2.ProcessRequest, tool_service_pb2.ProcessRequest, list[Any]]:
    blur = tool_service_pb2.ProcessRequest(
        tool="blur", params=dict_to_struct({"radius": 3}), output_media_type="image/x-raw-gray8"
    )
    omitted = tool_service_pb2.ProcessRequest(tool="sharpen", params=dict_to_struct({}), omit_output_image=True)
    steps = [
        tool_service_pb2.ProcessRequest(tool="grayscale", params=dict_to_struct({}), output_media_type="image/x-raw"),
        tool_service_pb2.ProcessRequest(
            tool="blur", params=dict_to_struct({"radius": 2}), output_media_type="image/png"
        ),
    ]
    return blur, omitted, steps


def _seen(result: ToolResult) -> tuple[bytes, str, int, int]:
    """What a caller gets: the image's pixels or file, and its header (fields, not their order on the wire)."""
    image = image_pb2.Image.FromString(bytes(result.image))
    return image.data, result.header.media_type, result.header.width, result.header.height


async def _three_at_once(invoker: GrpcToolInvoker, address: str, frames: list[bytes]) -> list[Any]:
    """Two Process calls and a two-step chain started together, on `frames` (one object each, or the same one)."""
    blur, omitted, steps = _requests()
    chained: list[ToolResult] = []

    async def chain_call() -> list[Any]:
        outcome = await invoker.process_chain(address, steps, frames[2], 30, lambda i, r, s: chained.append(r))
        assert outcome.failure is None
        return [_seen(r) for r in chained]

    first, second, third = await asyncio.gather(
        invoker.process(address, blur, frames[0], 30), invoker.process(address, omitted, frames[1], 30), chain_call()
    )
    return [_seen(first), _seen(second), third]


async def test_calls_on_one_frame_that_start_together_travel_in_one_call(counted_filter: tuple[str, Calls]) -> None:
    address, calls = counted_filter
    frame = raw_frame().SerializeToString()
    pool = ChannelPool(64 * MIB)
    try:
        one_by_one = await _three_at_once(GrpcToolInvoker(pool), address, [frame] * 3)
        assert sorted(calls.methods) == ["Process", "Process", "ProcessChain"]
        calls.methods.clear()
        gathering = GrpcToolInvoker(pool, branches=lambda a: True)
        together = await _three_at_once(gathering, address, [frame] * 3)
        assert calls.methods == ["ProcessBranches"]
        calls.methods.clear()
        copies = await _three_at_once(
            gathering, address, [frame, bytes(bytearray(frame)), bytes(bytearray(frame))]
        )  # equal, not the same
        assert sorted(calls.methods) == ["Process", "Process", "ProcessChain"]
    finally:
        await pool.close()
    assert together == one_by_one == copies
    assert together[0][1] == "image/x-raw-gray8" and len(together[0][0]) == 1024 * 576
    assert together[1][1] == "image/x-raw-rgb8" and not together[1][0]  # omitted: the header alone
    assert [seen[1] for seen in together[2]] == ["image/x-raw-gray8", "image/png"]


async def test_a_lone_call_or_a_small_frame_travels_on_its_own(counted_filter: tuple[str, Calls]) -> None:
    address, calls = counted_filter
    blur, omitted, _ = _requests()
    pool = ChannelPool(64 * MIB)
    invoker = GrpcToolInvoker(pool, branches=lambda a: True)
    try:
        await invoker.process(address, blur, raw_frame().SerializeToString(), 30)
        assert calls.methods == ["Process"]
        calls.methods.clear()
        small = raw_frame(320, 180).SerializeToString()
        assert len(small) < transport.GATHER_BYTES
        await asyncio.gather(invoker.process(address, blur, small, 30), invoker.process(address, omitted, small, 30))
        assert calls.methods == ["Process", "Process"]
    finally:
        await pool.close()


async def test_a_service_without_branches_is_called_one_by_one(filter_service: ToolServer) -> None:
    """A service whose manifest says it takes branches but whose build predates the method: UNIMPLEMENTED once, then
    each call on its own, with the same results; the next calls on that service go one by one at once."""
    relay, calls = OnlyUnary(filter_service.address), Calls()
    server, address = await start_old_build(relay, calls)
    pool = ChannelPool(64 * MIB)
    frame = raw_frame().SerializeToString()
    try:
        invoker = GrpcToolInvoker(pool, branches=lambda a: True)
        first = await _three_at_once(invoker, address, [frame] * 3)
        second = await _three_at_once(invoker, address, [frame] * 3)
        expected = await _three_at_once(GrpcToolInvoker(pool), filter_service.address, [frame] * 3)
    finally:
        await pool.close()
        await server.stop(0.1)
    assert first == second == expected
    assert calls.methods[0] == "ProcessBranches" and calls.methods.count("ProcessBranches") == 1
    assert sorted(calls.methods[1:]) == ["Process"] * 4 + ["ProcessChain"] * 2


async def test_a_branch_that_fails_fails_its_own_call_alone(counted_filter: tuple[str, Calls]) -> None:
    address, calls = counted_filter
    blur, _, _ = _requests()
    bad = tool_service_pb2.ProcessRequest(tool="blur", params=dict_to_struct({"radius": -5}))
    frame = raw_frame().SerializeToString()
    pool = ChannelPool(64 * MIB)
    try:
        with pytest.raises(ToolCallError) as alone:
            await GrpcToolInvoker(pool).process(address, bad, frame, 30)
        calls.methods.clear()
        gathering = GrpcToolInvoker(pool, branches=lambda a: True)
        good, failed = await asyncio.gather(
            gathering.process(address, blur, frame, 30), gathering.process(address, bad, frame, 30),
            return_exceptions=True,
        )  # fmt: skip
    finally:
        await pool.close()
    assert calls.methods == ["ProcessBranches"]
    assert isinstance(good, ToolResult) and good.header.media_type == "image/x-raw-gray8"
    assert isinstance(failed, ToolCallError)
    assert (failed.code, failed.message, failed.reason) == (alone.value.code, alone.value.message, alone.value.reason)
    assert failed.code == "INVALID_ARGUMENT" and "radius" in failed.message


@pytest.mark.parametrize("shared_memory", [False, True], ids=["inline", "shared-memory"])
async def test_a_caller_past_its_timeout_fails_and_the_others_get_their_answers(
    counted_filter: tuple[str, Calls], shared_memory: bool
) -> None:
    """A caller gives up at its own timeout while the call goes on for the other, slower branch; the answer that
    comes for it later is let go, and a frame it left in shared memory with it (raw output) is unlinked."""
    address, calls = counted_filter
    late = tool_service_pb2.ProcessRequest(
        tool="blur", params=dict_to_struct({"radius": 15}), output_media_type="image/x-raw"
    )
    slower = tool_service_pb2.ProcessRequest(tool="blur", params=dict_to_struct({"radius": 45}), omit_output_image=True)
    frame = raw_frame().SerializeToString()
    before = objects()
    pool = ChannelPool(64 * MIB)
    try:
        invoker = GrpcToolInvoker(pool, shared_memory=shared_memory, branches=lambda a: True)
        late, answered = await asyncio.gather(
            invoker.process(address, late, frame, 0.01), invoker.process(address, slower, frame, 30),
            return_exceptions=True,
        )  # fmt: skip
        await asyncio.wait_for(asyncio.gather(*invoker._sending), 10)  # the call ends with the slower answer
    finally:
        await pool.close()
    assert calls.methods[-1:] == ["ProcessBranches"]
    assert isinstance(late, ToolCallError) and (late.code, late.message) == ("DEADLINE_EXCEEDED", "Deadline Exceeded")
    assert isinstance(answered, ToolResult) and answered.header.width == 1024
    del late, answered
    gc.collect()
    await asyncio.sleep(0.2)  # the unlinker runs off the event loop
    assert objects() == before


async def test_a_lone_call_is_made_in_its_callers_task(
    counted_filter: tuple[str, Calls], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alone on its frame, a call is made by its caller, as any call is: cancelling the caller cancels the call."""
    address, _ = counted_filter
    tasks: list[asyncio.Task[Any] | None] = []
    unary = GrpcToolInvoker._unary

    async def spy(self: GrpcToolInvoker, *args: Any) -> Any:
        tasks.append(asyncio.current_task())
        return await unary(self, *args)

    monkeypatch.setattr(GrpcToolInvoker, "_unary", spy)
    blur, _, _ = _requests()
    pool = ChannelPool(64 * MIB)
    try:
        invoker = GrpcToolInvoker(pool, branches=lambda a: True)
        caller = asyncio.ensure_future(invoker.process(address, blur, raw_frame().SerializeToString(), 30))
        await caller
    finally:
        await pool.close()
    assert tasks == [caller]


class SilentBranches(tool_service_pb2_grpc.ToolServiceServicer):
    """Scripted: a ProcessBranches that never answers, and notes when its caller cancels it."""

    def __init__(self) -> None:
        self.started, self.cancelled = asyncio.Event(), asyncio.Event()

    async def ProcessBranches(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        yield tool_service_pb2.ProcessBranchesResponse()  # (never reached)


async def start_scripted(servicer: tool_service_pb2_grpc.ToolServiceServicer) -> tuple[grpc.aio.Server, str]:
    """A scripted tool service on a loopback port."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * MIB)])
    tool_service_pb2_grpc.add_ToolServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_when_every_caller_is_gone_the_call_is_cancelled() -> None:
    servicer = SilentBranches()
    server, address = await start_scripted(servicer)
    blur, omitted, _ = _requests()
    frame = raw_frame().SerializeToString()
    pool = ChannelPool(64 * MIB)
    try:
        invoker = GrpcToolInvoker(pool, branches=lambda a: True)
        callers = [asyncio.ensure_future(invoker.process(address, request, frame, 30)) for request in (blur, omitted)]
        await asyncio.wait_for(servicer.started.wait(), 10)
        callers[0].cancel()
        await asyncio.sleep(0.05)
        assert not servicer.cancelled.is_set()  # one caller is still waiting
        callers[1].cancel()
        await asyncio.wait_for(servicer.cancelled.wait(), 10)
        await asyncio.wait_for(asyncio.gather(*invoker._sending), 10)
    finally:
        await pool.close()
        await server.stop(0.1)
    assert all(caller.cancelled() for caller in callers)


async def test_a_crash_in_one_branch_fails_that_branch_alone(
    filter_service: ToolServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_chain = ToolPlane.run_chain

    async def crashing(self: ToolPlane, steps: Any, **kwargs: Any) -> Any:
        if steps[0].tool == "sharpen":
            raise RuntimeError("a bug in sharpen")
        return await run_chain(self, steps, **kwargs)

    monkeypatch.setattr(ToolPlane, "run_chain", crashing)
    blur, _, _ = _requests()
    crashed = tool_service_pb2.ProcessRequest(tool="sharpen", params=dict_to_struct({}))
    frame = raw_frame().SerializeToString()
    pool = ChannelPool(64 * MIB)
    try:
        gathering = GrpcToolInvoker(pool, branches=lambda a: True)
        good, failed = await asyncio.gather(
            gathering.process(filter_service.address, blur, frame, 30),
            gathering.process(filter_service.address, crashed, frame, 30),
            return_exceptions=True,
        )
    finally:
        await pool.close()
    assert isinstance(good, ToolResult) and good.header.media_type == "image/x-raw-gray8"
    assert isinstance(failed, ToolCallError) and failed.code == "INTERNAL" and "a bug" not in failed.message


async def test_a_chain_that_fails_part_way_answers_as_it_would_alone(counted_filter: tuple[str, Calls]) -> None:
    address, calls = counted_filter
    blur, _, _ = _requests()
    steps = [
        tool_service_pb2.ProcessRequest(tool="grayscale", params=dict_to_struct({}), output_media_type="image/x-raw"),
        tool_service_pb2.ProcessRequest(tool="blur", params=dict_to_struct({"radius": -5})),
    ]
    frame = raw_frame().SerializeToString()
    pool = ChannelPool(64 * MIB)

    async def chain(invoker: GrpcToolInvoker) -> tuple[Any, ...]:
        seen: list[tuple[int, ToolResult]] = []
        outcome = await invoker.process_chain(address, steps, frame, 30, lambda i, r, s: seen.append((i, r)))
        assert outcome.failure is not None
        failure = (outcome.completed, outcome.failure.code, outcome.failure.message, outcome.failure.reason)
        return failure, [(i, r.header) for i, r in seen], bytes(outcome.image or b"")

    try:
        alone = await chain(GrpcToolInvoker(pool))
        calls.methods.clear()
        gathering = GrpcToolInvoker(pool, branches=lambda a: True)
        together, _ = await asyncio.gather(chain(gathering), gathering.process(address, blur, frame, 30))
    finally:
        await pool.close()
    assert calls.methods == ["ProcessBranches"]
    assert together[:2] == alone[:2] and alone[0][:2] == (1, "INVALID_ARGUMENT")
    assert image_pb2.Image.FromString(together[2]) == image_pb2.Image.FromString(alone[2])  # the last good image


class MisbehavingBranches(tool_service_pb2_grpc.ToolServiceServicer):
    """Scripted: a ProcessBranches that answers a branch out of range, or ends before answering every branch."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    async def ProcessBranches(self, request: Any, context: Any) -> AsyncIterator[Any]:
        index = 7 if self.answer == "out-of-range" else 0
        yield tool_service_pb2.ProcessBranchesResponse(
            branch_index=index,
            response=tool_service_pb2.ProcessChainResponse(
                image=image_pb2.Image(media_type="image/png", width=1, height=1),
                results=[tool_service_pb2.ChainStepResult(media_type="image/png", width=1, height=1)],
            ),
        )


@pytest.mark.parametrize(
    ("answer", "message"),
    [("out-of-range", "answered branch 7 twice or out of range"), ("too-few", "before answering every branch")],
)
async def test_a_malformed_branches_answer_fails_the_calls_it_leaves_unanswered(answer: str, message: str) -> None:
    server, address = await start_scripted(MisbehavingBranches(answer))
    blur, omitted, _ = _requests()
    frame = raw_frame().SerializeToString()
    pool = ChannelPool(64 * MIB)
    try:
        invoker = GrpcToolInvoker(pool, branches=lambda a: True)
        outcomes = await asyncio.gather(
            invoker.process(address, blur, frame, 30),
            invoker.process(address, omitted, frame, 30),
            return_exceptions=True,
        )
    finally:
        await pool.close()
        await server.stop(0.1)
    failed = [o for o in outcomes if isinstance(o, ToolCallError)]
    assert failed and all(f.code == "INTERNAL" and message in f.message for f in failed)
    if answer == "too-few":  # branch 0 was answered before the call ended
        assert isinstance(outcomes[0], ToolResult) and len(failed) == 1


# --- end to end ----------------------------------------------------------------------------------------------------

DIAMOND = [
    ("root", "flip", {"direction": "horizontal"}, []),
    ("left", "blur", {"radius": 3}, ["root"]),
    ("right", "sharpen", {}, ["root"]),
    ("join", "grayscale", {}, ["left", "right"]),
    ("both", "edge_detect", {}, ["left", "right"]),
]


async def test_a_diamond_on_loopback_services_gives_the_same_bytes_with_its_branches_in_one_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loopback tool services: root's raw frame (4.3 MB) goes to `left` and `right` on the filter service in one
    ProcessBranches call, then left's gray frame (1.4 MB) to `join` and `both` in another; the same output bytes and
    the same per-step events as with every call on its own."""
    gathered: list[int] = []
    send = GrpcToolInvoker._send_branches

    async def spy(self: GrpcToolInvoker, address: str, image: Any, branches: list[Any]) -> Any:
        gathered.append(len(branches))
        return await send(self, address, image, branches)

    monkeypatch.setattr(GrpcToolInvoker, "_send_branches", spy)
    photo = cv2.imdecode(np.frombuffer(sample("astronaut.jpg"), np.uint8), cv2.IMREAD_COLOR)
    image = cv2.imencode(".png", cv2.resize(photo, (1600, 900)))[1].tobytes()
    outputs, steps = [], []
    for gathers in (True, False):
        threshold = transport.GATHER_BYTES if gathers else 1 << 40
        monkeypatch.setattr(transport, "GATHER_BYTES", threshold)
        gathered.clear()
        plane = await start_control_plane(
            Settings(host="127.0.0.1", port=0, database_url=f"sqlite:///{tmp_path / str(gathers)}",
                     embedded_in_process=False)
        )  # fmt: skip
        try:
            assert all(plane.registry.takes_branches(server.address) for server in plane.tool_servers)
            events = await run(plane.address, DIAMOND, image)
        finally:
            await plane.stop(0.1)
        finished = events[-1].execution_finished
        assert finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED, finished.message
        outputs.append({o.step_id: o.image.data for o in finished.outputs})
        steps.append(sorted((e.WhichOneof("kind"), _step_of(e)) for e in events if _step_of(e)))
        assert gathered == ([2, 2] if gathers else [])
    assert outputs[0] == outputs[1] and sorted(outputs[0]) == ["both", "join"]
    assert steps[0] == steps[1] and len(steps[0]) == 2 * len(DIAMOND)


def _step_of(event: execution_pb2.ExecutionEvent) -> str:
    kind = event.WhichOneof("kind")
    return getattr(event, kind).step_id if kind and kind.startswith("step_") else ""


async def test_an_address_takes_branches_only_when_all_its_tools_say_so(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'r.db'}")
    says = {"127.0.0.1:7001": (True, True), "127.0.0.1:7002": (True, False)}

    class Describer:
        async def describe(self, address: str) -> list[tool_pb2.Tool]:
            tools = []
            for index, flag in enumerate(says[address]):
                tool = manifest(f"t{address[-1]}{index}", address).manifest
                tool.takes_branches = flag
                tools.append(tool)
            return tools

        async def forget(self, address: str) -> None:
            pass

    registry = Registry(store, Describer())
    try:
        for address in says:
            await registry.register(address)
        assert registry.takes_branches("127.0.0.1:7001")
        assert not registry.takes_branches("127.0.0.1:7002")  # one of its tools does not say so
        assert not registry.takes_branches("127.0.0.1:7003")  # not registered
    finally:
        await store.close()
