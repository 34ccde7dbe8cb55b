"""Consecutive steps on one tool service travel in one ProcessChain call: same bytes as step by step, events still
per step, a failing step reported as that step, and a retry that resumes at the failing step."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from imageflow.common.structs import dict_to_struct
from imageflow.server.adapters.storage import open_store
from imageflow.server.app import ControlPlane, start_control_plane
from imageflow.server.domain.compiler import compile_pipeline
from imageflow.server.domain.events import EventHub
from imageflow.server.domain.executor import (
    ChainOutcome,
    Executor,
    ExecutorLimits,
    StepCallback,
    ToolCallError,
    ToolResult,
)
from imageflow.server.domain.frames import Frame, ImageHeader
from imageflow.server.domain.store import EventWrite
from imageflow.server.domain.tool_records import RegisteredTool
from imageflow.server.settings import Settings
from imageflow.v1 import (
    execution_pb2,
    image_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_pb2,
    tool_service_pb2,
)

from tests.conftest import aio_channel, sample

Steps = list[tuple[str, str, dict[str, Any], list[str]]]
FILTERS: Steps = [
    ("gray", "grayscale", {}, []),
    ("soft", "blur", {"radius": 3}, ["gray"]),
    ("crisp", "sharpen", {}, ["soft"]),
    ("edges", "edge_detect", {}, ["crisp"]),
]
WITH_ENCODE: Steps = [
    ("small", "resize", {"scale": 0.5}, []),
    ("webp", "encode", {"format": "webp", "quality": 60}, ["small"]),
    ("turn", "rotate", {"angle": 90}, ["webp"]),
]
TO_EDGES: Steps = [  # crop and flip are one chain that decodes luma; step by step, crop is asked for raw gray
    ("cut", "crop", {"width": 400, "height": 300, "anchor": "center"}, []),
    ("mirror", "flip", {"direction": "horizontal"}, ["cut"]),
    ("edges", "edge_detect", {}, ["mirror"]),
]


def definition(steps: Steps) -> pipeline_pb2.Pipeline:
    pipeline = pipeline_pb2.Pipeline(name="chain")
    for step_id, tool, params, deps in steps:
        pipeline.steps.add(id=step_id, tool=tool, params=dict_to_struct(params), depends_on=deps)
    return pipeline


async def run(address: str, steps: Steps, image: bytes) -> list[execution_pb2.ExecutionEvent]:
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=definition(steps), inputs={"image": image_pb2.Image(data=image)}
    )
    async with aio_channel(address) as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        return [reply.event async for reply in stub.ExecutePipeline(request)]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def planes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, ControlPlane]]:
    """Loopback tool services (no in-process shortcut), with and without chains."""
    made = {}
    for name, chains in (("chained", True), ("stepwise", False)):
        db = tmp_path_factory.mktemp(name) / "db.sqlite"
        made[name] = await start_control_plane(
            Settings(
                host="127.0.0.1", port=0, database_url=f"sqlite:///{db}", embedded_in_process=False, chain_steps=chains
            )
        )
    yield made
    for plane in made.values():
        await plane.stop(0.5)


def _pixels(image: image_pb2.Image) -> image_pb2.Image:
    """The image without its blob reference (which names the execution)."""
    copy = image_pb2.Image()
    copy.CopyFrom(image)
    copy.ClearField("blob_ref")
    return copy


@pytest.mark.parametrize(
    ("steps", "longest"), [(FILTERS, 4), (WITH_ENCODE, 3), (TO_EDGES, 2)], ids=["filters", "encode-inside", "luma"]
)
async def test_a_chain_gives_the_same_bytes_as_step_by_step(
    planes: dict[str, ControlPlane], steps: Steps, longest: int
) -> None:
    compiled = compile_pipeline(definition(steps), planes["chained"].registry.snapshot())
    assert len(max(compiled.chains.values(), key=len)) == longest  # the run really travels as one chain
    image = sample("astronaut.jpg")
    chained = (await run(planes["chained"].address, steps, image))[-1].execution_finished
    stepwise = (await run(planes["stepwise"].address, steps, image))[-1].execution_finished
    assert chained.state == stepwise.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
    assert [_pixels(o.image) for o in chained.outputs] == [_pixels(o.image) for o in stepwise.outputs]


async def test_chain_events_stay_per_step_and_in_order(planes: dict[str, ControlPlane]) -> None:
    events = await run(planes["chained"].address, FILTERS, sample("coffee.jpg"))
    kinds = [(e.WhichOneof("kind"), getattr(e, e.WhichOneof("kind")).step_id) for e in events[1:-1]]
    expected = []
    for step_id, *_ in FILTERS:
        expected += [("step_started", step_id), ("step_succeeded", step_id)]
    assert kinds == expected
    assert all(e.step_succeeded.duration.ToNanoseconds() > 0 for e in events if e.HasField("step_succeeded"))
    assert events[-1].execution_finished.outputs[0].image.media_type == "image/jpeg"


async def test_a_step_failing_inside_a_chain_is_reported_as_that_step(planes: dict[str, ControlPlane]) -> None:
    steps: Steps = [
        ("small", "resize", {"scale": 0.25}, []),
        ("cut", "crop", {"x": 5000, "y": 0, "width": 10, "height": 10}, ["small"]),
        ("flip", "flip", {"direction": "horizontal"}, ["cut"]),
    ]
    events = await run(planes["chained"].address, steps, sample("astronaut.jpg"))
    by_kind = {(e.WhichOneof("kind"), getattr(e, e.WhichOneof("kind")).step_id): e for e in events[1:-1]}
    assert ("step_succeeded", "small") in by_kind
    failed = by_kind[("step_failed", "cut")].step_failed
    assert failed.code == "INVALID_ARGUMENT" and "outside" in failed.message and failed.attempts == 1
    assert ("step_skipped", "flip") in by_kind
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_FAILED


def manifest(name: str, address: str = "fake:1") -> RegisteredTool:
    tool = tool_pb2.Tool(name=name, version="1", address=address, kind=tool_pb2.TOOL_KIND_SERVICE, enabled=True,
                         chainable=True, params_schema=dict_to_struct({"type": "object"}))  # fmt: skip
    tool.inputs.add(name="image", type=tool_pb2.PORT_TYPE_IMAGE, required=True)
    tool.outputs.add(name="image", type=tool_pb2.PORT_TYPE_IMAGE)
    return RegisteredTool.of(tool)


class FlakyChainInvoker:
    """Fails the second step once with UNAVAILABLE after the first succeeded; records what each call was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], bytes]] = []

    def keeps_frames(self, address: str) -> bool:
        return False

    async def process(self, address: str, request: tool_service_pb2.ProcessRequest, image: Frame, timeout_s: float) -> ToolResult:
        raise AssertionError("a chain must not fall back to Process")

    async def process_chain(self, address: str, requests: Sequence[tool_service_pb2.ProcessRequest], image: Frame,
                            timeout_s: float, on_step: StepCallback,
                            addresses: Sequence[str] | None = None) -> ChainOutcome:  # fmt: skip
        tools = [r.tool for r in requests]
        self.calls.append((tools, bytes(image)))
        header = ImageHeader("image/x-raw-rgb8", 1, 1)
        out = image_pb2.Image(data=b"\x01\x02\x03", media_type="image/x-raw-rgb8", width=1, height=1)
        if len(self.calls) == 1:
            on_step(0, ToolResult(b"", header), 0.001)
            return ChainOutcome(1, ToolCallError("UNAVAILABLE", "restarting"), out.SerializeToString())
        await asyncio.sleep(0)
        for index in range(len(requests)):
            final = out.SerializeToString() if index == len(requests) - 1 else b""
            on_step(index, ToolResult(final, header), 0.001)
        return ChainOutcome(len(requests))


async def test_a_retry_resumes_at_the_failing_step_with_the_last_good_image(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    hub = EventHub(store, [])
    invoker = FlakyChainInvoker()
    executor = Executor(store, hub, invoker, lambda address: True, ExecutorLimits())  # type: ignore[arg-type]
    tools = {name: manifest(name) for name in ("a", "b", "c")}
    compiled = compile_pipeline(definition([("a", "a", {}, []), ("b", "b", {}, ["a"]), ("c", "c", {}, ["b"])]), tools)
    assert compiled.chains == {"a": ("a", "b", "c")}
    source = image_pb2.Image(data=b"\x09\x09\x09", media_type="image/x-raw-rgb8", width=1, height=1)
    execution_id, _ = await executor.start(compiled, {"image": source})
    events = [e async for e in hub.watch(execution_id, 0)]
    await store.close()
    assert [c[0] for c in invoker.calls] == [["a", "b", "c"], ["b", "c"]]
    assert image_pb2.Image.FromString(invoker.calls[1][1]).data == b"\x01\x02\x03"  # resumed on a's output
    kinds = [(e.WhichOneof("kind"), getattr(e, e.WhichOneof("kind")).step_id) for e in events[1:-1]]
    assert kinds == [
        ("step_started", "a"), ("step_succeeded", "a"), ("step_started", "b"), ("step_retrying", "b"),
        ("step_started", "b"), ("step_succeeded", "b"), ("step_started", "c"), ("step_succeeded", "c"),
    ]  # fmt: skip
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED


class CrashingInvoker(FlakyChainInvoker):
    """A bug in an invoker (not a ToolCallError)."""

    async def process_chain(self, address: str, requests: Sequence[tool_service_pb2.ProcessRequest], image: Frame,
                            timeout_s: float, on_step: StepCallback,
                            addresses: Sequence[str] | None = None) -> ChainOutcome:  # fmt: skip
        raise ValueError("a bug")


async def test_a_crashing_step_fails_as_internal_and_the_execution_fails(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    hub = EventHub(store, [])
    executor = Executor(store, hub, CrashingInvoker(), lambda address: True, ExecutorLimits())  # type: ignore[arg-type]
    tools = {name: manifest(name) for name in ("a", "b")}
    compiled = compile_pipeline(definition([("a", "a", {}, []), ("b", "b", {}, ["a"])]), tools)
    source = image_pb2.Image(data=b"\x09\x09\x09", media_type="image/x-raw-rgb8", width=1, height=1)
    execution_id, _ = await executor.start(compiled, {"image": source})
    events = [e async for e in hub.watch(execution_id, 0)]
    await store.close()
    failed = [e.step_failed for e in events if e.HasField("step_failed")]
    assert [(f.step_id, f.code) for f in failed] == [("a", "INTERNAL")]
    assert [e.step_skipped.step_id for e in events if e.HasField("step_skipped")] == ["b"]
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_FAILED


async def test_an_embedded_chain_past_its_deadline_reports_nothing_late(tmp_path: Path) -> None:
    """The worker outlives the deadline (threads cannot be stopped); its late steps are not reported."""
    import time
    from types import SimpleNamespace

    import numpy as np
    from imageflow.server.adapters.embedded import EmbeddedInvoker
    from imageflow.tools.imaging import ImageLimits
    from imageflow.tools.plane import ToolPlane
    from imageflow.tools.spec import ToolOutput, ToolSpec

    def quick(inp: Any) -> ToolOutput:
        return ToolOutput(pixels=np.ascontiguousarray(inp.pixels[:, ::-1]))

    def slow(inp: Any) -> ToolOutput:
        time.sleep(0.4)
        return ToolOutput(pixels=np.ascontiguousarray(inp.pixels[::-1]))

    specs = (ToolSpec("a", "1", "", "", {"type": "object"}, quick), ToolSpec("b", "1", "", "", {"type": "object"}, slow),
             ToolSpec("c", "1", "", "", {"type": "object"}, quick))  # fmt: skip
    plane = ToolPlane("svc", specs, ImageLimits())
    invoker = EmbeddedInvoker([SimpleNamespace(address="fake:1", kind="filter", servicer=SimpleNamespace(plane=plane))])  # type: ignore[list-item]
    store = await open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    hub = EventHub(store, [])
    executor = Executor(store, hub, invoker, lambda address: True, ExecutorLimits())  # type: ignore[arg-type]
    pipeline = definition([("a", "a", {}, []), ("b", "b", {}, ["a"]), ("c", "c", {}, ["b"])])
    for step in pipeline.steps:
        step.policy.timeout.FromMilliseconds(100)
    compiled = compile_pipeline(pipeline, {name: manifest(name) for name in ("a", "b", "c")})
    source = image_pb2.Image(data=bytes(4 * 4 * 3), media_type="image/x-raw-rgb8", width=4, height=4)
    execution_id, _ = await executor.start(compiled, {"image": source})
    events = [e async for e in hub.watch(execution_id, 0)]
    await asyncio.sleep(0.6)  # the abandoned worker finishes meanwhile
    await store.close()
    plane.close()
    kinds = [(e.WhichOneof("kind"), getattr(e, e.WhichOneof("kind")).step_id) for e in events[1:-1]]
    assert ("step_failed", "b") in kinds and ("step_skipped", "c") in kinds
    assert ("step_succeeded", "b") not in kinds and ("step_succeeded", "c") not in kinds
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_FAILED


class SlowCreateStore:
    """Wraps a real store; creating an execution row waits on a gate, as a busy database would."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gate = asyncio.Event()

    async def create_execution(self, row: Any) -> Any:
        await self.gate.wait()
        return await self.inner.create_execution(row)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_the_execution_limit_is_exact_under_concurrent_starts(tmp_path: Path) -> None:
    inner = await open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store = SlowCreateStore(inner)
    executor = Executor(store, EventHub(store, []), FlakyChainInvoker(), lambda address: True,  # type: ignore[arg-type]
                        ExecutorLimits(executions=2))  # fmt: skip
    compiled = compile_pipeline(definition([("a", "a", {}, [])]), {"a": manifest("a")})
    source = image_pb2.Image(data=b"\x09\x09\x09", media_type="image/x-raw-rgb8", width=1, height=1)
    starts = [asyncio.create_task(executor.start(compiled, {"image": source})) for _ in range(5)]
    await asyncio.sleep(0)  # every start has passed the limit check and waits on the store
    store.gate.set()
    results = await asyncio.gather(*starts, return_exceptions=True)
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(refused) == 3 and all("the limit is 2" in str(r) for r in refused)
    await asyncio.sleep(0.2)
    await inner.close()


class LastStepLaterInvoker(FlakyChainInvoker):
    """Reports all steps but the last at once, the last one 10 ms later, and returns 10 ms after that (a real call's
    thread hand-offs), so the last step's event would otherwise get a store write of its own."""

    async def process_chain(self, address: str, requests: Sequence[tool_service_pb2.ProcessRequest], image: Frame,
                            timeout_s: float, on_step: StepCallback,
                            addresses: Sequence[str] | None = None) -> ChainOutcome:  # fmt: skip
        header = ImageHeader("image/x-raw-rgb8", 1, 1)
        out = image_pb2.Image(data=b"\x01\x02\x03", media_type="image/x-raw-rgb8", width=1, height=1)
        for index in range(len(requests) - 1):
            on_step(index, ToolResult(b"", header), 0.001)
        await asyncio.sleep(0.01)
        on_step(len(requests) - 1, ToolResult(out.SerializeToString(), header), 0.001)
        await asyncio.sleep(0.01)
        return ChainOutcome(len(requests))


async def test_the_first_and_last_steps_events_share_store_writes_with_their_neighbours(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    writes: list[list[int]] = []
    append = store.append_events

    async def recording(execution_id: str, events: Sequence[EventWrite]) -> None:
        writes.append([e.sequence for e in events])
        await append(execution_id, events)

    store.append_events = recording  # type: ignore[method-assign]
    hub = EventHub(store, [])
    invoker = LastStepLaterInvoker()
    executor = Executor(store, hub, invoker, lambda address: True, ExecutorLimits())  # type: ignore[arg-type]
    tools = {name: manifest(name) for name in ("a", "b", "c")}
    compiled = compile_pipeline(definition([("a", "a", {}, []), ("b", "b", {}, ["a"]), ("c", "c", {}, ["b"])]), tools)
    source = image_pb2.Image(data=b"\x09\x09\x09", media_type="image/x-raw-rgb8", width=1, height=1)
    execution_id, _ = await executor.start(compiled, {"image": source})
    events = [e async for e in hub.watch(execution_id, 0)]
    await store.close()
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
    assert events[-2].step_succeeded.step_id == "c"
    assert writes[-1][-2:] == [events[-2].sequence, events[-1].sequence]  # one round trip at the end, not two
    assert writes[0][:2] == [1, 2] and events[1].step_started.step_id == "a"  # and one at the start: started + a's
    assert [s for write in writes for s in write] == [e.sequence for e in events]  # each stored once, in order


def test_a_chain_group_joins_addresses_and_only_those() -> None:
    """Steps on different addresses chain only when the group says they are one (the embedded services)."""
    tools = {"a": manifest("a", "here:1"), "b": manifest("b", "here:2"), "c": manifest("c", "there:1")}
    steps = definition([("a", "a", {}, []), ("b", "b", {}, ["a"]), ("c", "c", {}, ["b"])])
    assert compile_pipeline(steps, tools).chains == {}
    joined = compile_pipeline(steps, tools, chain_group=lambda address: address.split(":")[0])
    assert joined.chains == {"a": ("a", "b")}  # there:1 is its own group


async def test_a_chain_with_a_member_no_longer_registered_runs_nothing(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    hub = EventHub(store, [])
    invoker = FlakyChainInvoker()
    allowed = {"here:1"}
    executor = Executor(store, hub, invoker, lambda address: address in allowed, ExecutorLimits())  # type: ignore[arg-type]
    tools = {"a": manifest("a", "here:1"), "b": manifest("b", "here:2")}
    compiled = compile_pipeline(definition([("a", "a", {}, []), ("b", "b", {}, ["a"])]), tools, chain_group=lambda _: "g")
    assert compiled.chains == {"a": ("a", "b")}
    source = image_pb2.Image(data=b"\x09\x09\x09", media_type="image/x-raw-rgb8", width=1, height=1)
    execution_id, _ = await executor.start(compiled, {"image": source})
    events = [e async for e in hub.watch(execution_id, 0)]
    await store.close()
    assert invoker.calls == []  # here:2 was unregistered after compiling: the chain does not run at all
    steps = [(e.WhichOneof("kind"), getattr(e, e.WhichOneof("kind"))) for e in events[1:-1]]
    assert [(kind, body.step_id) for kind, body in steps] == [("step_skipped", "a"), ("step_failed", "b")]
    assert "'b'" in steps[0][1].reason and "here:2" in steps[0][1].reason
    assert steps[1][1].code == "PERMISSION_DENIED" and "here:2" in steps[1][1].message
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_FAILED


async def test_a_chain_across_embedded_services_runs_each_step_on_its_own_address() -> None:
    """Each step runs on the plane at the address the executor checked, never one found by tool name; an address not
    hosted here is refused before anything runs."""
    from types import SimpleNamespace

    import numpy as np
    from imageflow.server.adapters.embedded import EmbeddedInvoker
    from imageflow.tools.imaging import ImageLimits
    from imageflow.tools.plane import ToolPlane
    from imageflow.tools.spec import ToolOutput, ToolSpec

    def mirror(inp: Any) -> ToolOutput:
        return ToolOutput(pixels=np.ascontiguousarray(inp.pixels[:, ::-1]))

    here = ToolPlane("here", (ToolSpec("a", "1", "", "", {"type": "object"}, mirror),), ImageLimits())
    there = ToolPlane("there", (ToolSpec("b", "1", "", "", {"type": "object"}, mirror),), ImageLimits())
    servers = [SimpleNamespace(address=f"{p.service}:1", kind=k, servicer=SimpleNamespace(plane=p))
               for p, k in ((here, "resize"), (there, "filter"))]  # fmt: skip
    invoker = EmbeddedInvoker(servers)  # type: ignore[arg-type]
    assert invoker.chain_group("here:1") == invoker.chain_group("there:1") != invoker.chain_group("elsewhere:1")
    source = image_pb2.Image(data=bytes(2 * 2 * 3), media_type="image/x-raw-rgb8", width=2, height=2)
    requests = [tool_service_pb2.ProcessRequest(tool="a"), tool_service_pb2.ProcessRequest(tool="b")]
    done: list[int] = []
    outcome = await invoker.process_chain("here:1", requests, source.SerializeToString(), 5, lambda i, r, s: done.append(i),
                                          ["here:1", "there:1"])  # fmt: skip
    assert outcome.failure is None and done == [0, 1]
    # "b" named at an address whose plane does not serve it: that plane refuses it, nothing is routed by name
    swapped = await invoker.process_chain("here:1", requests, source.SerializeToString(), 5, lambda *_: None,
                                          ["here:1", "here:1"])  # fmt: skip
    assert swapped.failure is not None and swapped.failure.code == "INVALID_ARGUMENT" and "'b'" in swapped.failure.message
    with pytest.raises(ToolCallError) as refused:
        await invoker.process_chain("here:1", requests, source.SerializeToString(), 5, lambda *_: None,
                                    ["here:1", "elsewhere:1"])  # fmt: skip
    assert refused.value.code == "INTERNAL"
    here.close()
    there.close()
