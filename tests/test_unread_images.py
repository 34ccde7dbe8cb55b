"""A step whose image nobody reads (not an output; its dependents read only its detections, or only wait on it) is
asked to omit the image from its answer (`omit_output_image`): the tool sends its type and size, detections and
metadata, and no pixels. Results are the same bytes; a tool that predates the field sends the image all the same."""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from imageflow.common.errors import ImageflowError
from imageflow.common.media import RAW_GRAY
from imageflow.common.shm import SHM_DIR, UNLINKER
from imageflow.common.structs import dict_to_struct
from imageflow.server.adapters.storage import open_store
from imageflow.server.adapters.transport import ChannelPool, GrpcToolInvoker
from imageflow.server.app import ControlPlane, start_control_plane
from imageflow.server.domain.compiler import compile_pipeline
from imageflow.server.domain.events import EventHub
from imageflow.server.domain.executor import ChainOutcome, Executor, ExecutorLimits, StepCallback, ToolResult
from imageflow.server.domain.frames import Frame, ImageHeader, inline
from imageflow.server.domain.tool_records import RegisteredTool
from imageflow.server.settings import Settings
from imageflow.tools import filters, geometry
from imageflow.tools.detection import Detector, OnnxRuntimeBackend, detect_tool
from imageflow.tools.imaging import ImageLimits, decode
from imageflow.tools.runner import process_decoded
from imageflow.tools.servicer import tool_message
from imageflow.v1 import (
    execution_pb2,
    image_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_service_pb2,
    tool_service_pb2_grpc,
)

from tests.conftest import aio_channel, execute_outputs, sample

DETECT = detect_tool(Detector(OnnxRuntimeBackend.__new__(OnnxRuntimeBackend)))  # the manifest: no model loaded
SPECS = {spec.name: spec for spec in (*geometry.TOOLS, *filters.TOOLS, DETECT)}
Steps = list[tuple[str, str, dict[str, Any], list[str], dict[str, str]]]

FLIP = {"direction": "horizontal"}
# root feeds two branches; the join reads left's image and waits on right: nobody reads right's image
DIAMOND: Steps = [
    ("root", "flip", {"direction": "horizontal"}, [], {}),
    ("left", "blur", {"radius": 2}, ["root"], {}),
    ("right", "blur", {"radius": 3}, ["root"], {}),
    ("join", "grayscale", {}, ["left", "right"], {}),
]
SINGLE: Steps = [
    ("root", "flip", {"direction": "horizontal"}, [], {}),
    ("left", "blur", {"radius": 2}, ["root"], {}),
    ("join", "grayscale", {}, ["left"], {}),
]
# detect on a half-size copy, blur the faces on the original: the copy's detect step is read for its boxes alone
DETECT_ON_COPY: Steps = [
    ("small", "resize", {"scale": 0.5}, [], {}),
    ("find", "detect", {"classes": ["face"]}, ["small"], {}),
    ("hide", "blur_regions", {"method": "pixelate"}, ["find"], {"image": "$image", "detections": "find.detections"}),
]


def pipeline(steps: Steps, outputs: Sequence[str] = ()) -> pipeline_pb2.Pipeline:
    result = pipeline_pb2.Pipeline(name="unread", outputs=list(outputs))
    for step_id, tool, params, deps, inputs in steps:
        result.steps.add(id=step_id, tool=tool, params=dict_to_struct(params), depends_on=deps, inputs=inputs)
    return result


def manifest(name: str, address: str = "fake:1") -> RegisteredTool:
    tool = tool_message(SPECS[name])
    tool.address = address
    return RegisteredTool.of(tool)


def external_blur() -> RegisteredTool:
    """A third-party tool whose image output is named `result`, not `image`."""
    tool = tool_message(SPECS["blur"])
    tool.name, tool.address = "ext_blur", "ext:1"
    for port in tool.outputs:
        port.name = "result"
    return RegisteredTool.of(tool)


TOOLS = {**{name: manifest(name) for name in SPECS}, "ext_blur": external_blur()}


@pytest.mark.parametrize(
    ("steps", "outputs", "unread"),
    [
        (DIAMOND, (), {"right"}),
        (DIAMOND, ("join", "right"), set()),  # an output is always sent
        (SINGLE, (), set()),
        (DETECT_ON_COPY, (), {"find"}),
        (DETECT_ON_COPY, ("hide", "find"), set()),
        # a sink that is not an output: nobody reads it
        ([("a", "flip", FLIP, [], {}), ("b", "blur", {}, ["a"], {}), ("c", "sharpen", {}, ["a"], {})], ("b",), {"c"}),
        # read through explicit wiring, with no depends_on
        ([("a", "flip", FLIP, [], {}), ("b", "blur", {}, [], {"image": "a"})], (), set()),
        # read through an image output that its tool names otherwise
        ([("a", "ext_blur", {}, [], {}), ("b", "flip", FLIP, [], {"image": "a.result"})], (), set()),
        # several dependents: one reading the image is enough; none reading it, and it is unread
        ([("a", "flip", FLIP, [], {}), ("b", "blur", {}, ["a"], {"image": "$image"}), ("c", "sharpen", {}, ["a"], {})],
         ("b", "c"), set()),
        ([("a", "flip", FLIP, [], {}), ("b", "blur", {}, ["a"], {"image": "$image"}),
          ("c", "sharpen", {}, ["a"], {"image": "$image"})], ("b", "c"), {"a"}),
        # a chain whose last member nobody reads
        ([("root", "flip", FLIP, [], {}), ("out", "grayscale", {}, ["root"], {}), ("a", "blur", {}, ["root"], {}),
          ("b", "sharpen", {}, ["a"], {})], ("out",), {"b"}),
    ],
)  # fmt: skip
def test_the_compiler_marks_steps_whose_image_nobody_reads(
    steps: Steps, outputs: tuple[str, ...], unread: set[str]
) -> None:
    assert compile_pipeline(pipeline(steps, outputs), TOOLS).unread_images == unread


def test_a_read_through_another_port_name_keeps_a_step_in_colour() -> None:
    """`a`'s image goes to grayscale (luma) and, through its `result` port, to blur (colour): it stays colour."""
    steps: Steps = [("a", "ext_blur", {}, [], {}), ("g", "grayscale", {}, ["a"], {}),
                    ("b", "blur", {}, ["a"], {"image": "a.result"})]  # fmt: skip
    assert compile_pipeline(pipeline(steps), TOOLS, chains=False).luma_steps == set()


def test_an_omitted_image_still_names_its_type_and_size_and_checks_the_type() -> None:
    image = decode(sample("chelsea.jpg"), "", 0, 0, ImageLimits())
    spec, checked = SPECS["resize"], SPECS["resize"].validated_params({"scale": 0.5})
    for asked, media_type in (("image/x-raw", "image/x-raw-rgb8"), (RAW_GRAY, RAW_GRAY), ("image/png", "image/png")):
        result = process_decoded(
            spec, checked, image, source_data=None, detections=[], output_media_type=asked, output_quality=0,
            omit_image=True,
        )  # fmt: skip
        assert (result.data, result.pixels, result.media_type) == (b"", None, media_type)
        assert (result.width, result.height) == (226, 150)
    with pytest.raises(ImageflowError) as refused:
        process_decoded(spec, checked, image, source_data=None, detections=[], output_media_type="image/bmp-ish",
                        output_quality=0, omit_image=True)  # fmt: skip
    assert refused.value.reason == "OUTPUT_TYPE_UNSUPPORTED"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def planes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, ControlPlane]]:
    """Tool services over loopback gRPC with frames inline and in shared memory, and tools in process."""
    made = {}
    for name, separate, shared in (("inline", True, False), ("shm", True, True), ("in-process", False, False)):
        db = tmp_path_factory.mktemp(f"unread-{name}") / "db.sqlite"
        made[name] = await start_control_plane(
            Settings(
                host="127.0.0.1",
                port=0,
                database_url=f"sqlite:///{db}",
                embedded_in_process=not separate,
                tool_shared_memory=shared,
            )
        )
    yield made
    for plane in made.values():
        await plane.stop(0.5)


async def run(plane: ControlPlane, steps: Steps, outputs: Sequence[str] = ()) -> dict[str, image_pb2.Image]:
    return await execute_outputs(plane.address, pipeline(steps, outputs), sample("astronaut.jpg"))


@pytest.mark.parametrize("kind", ["inline", "shm", "in-process"])
async def test_a_diamond_whose_branch_is_unread_gives_the_bytes_of_its_read_path(
    planes: dict[str, ControlPlane], kind: str
) -> None:
    before = {p.name for p in SHM_DIR.glob("imageflow-*")}
    diamond = await run(planes[kind], DIAMOND)
    assert set(diamond) == {"join"}
    assert diamond["join"] == (await run(planes[kind], SINGLE))["join"]
    assert diamond["join"].data.startswith(b"\xff\xd8")  # the input's own format, JPEG
    UNLINKER.settle()
    assert {p.name for p in SHM_DIR.glob("imageflow-*")} <= before  # nothing left in /dev/shm


@pytest.mark.parametrize("kind", ["inline", "in-process"])
async def test_detections_of_a_step_whose_image_is_unread_still_reach_their_reader(
    planes: dict[str, ControlPlane], kind: str
) -> None:
    omitted = await run(planes[kind], DETECT_ON_COPY)
    sent = await run(planes[kind], DETECT_ON_COPY, outputs=("hide", "find"))  # find an output: its image is sent
    assert omitted["hide"] == sent["hide"]
    assert omitted["hide"].data != sample("astronaut.jpg")  # the face was pixelated, on the original's size
    assert (omitted["hide"].width, omitted["hide"].height) == (512, 512)


@pytest.mark.parametrize("kind", ["inline", "shm", "in-process"])
async def test_a_chain_whose_last_image_is_unread_runs_and_leaves_the_output_alone(
    planes: dict[str, ControlPlane], kind: str
) -> None:
    steps: Steps = [("root", "flip", FLIP, [], {}), ("out", "grayscale", {}, ["root"], {}),
                    ("a", "blur", {}, ["root"], {}), ("b", "sharpen", {}, ["a"], {})]  # fmt: skip
    unread = await run(planes[kind], steps, outputs=("out",))
    sent = await run(planes[kind], steps, outputs=("out", "b"))
    assert set(unread) == {"out"} and unread["out"] == sent["out"]


async def test_the_transport_passes_the_request_on_one_call_and_a_chain(planes: dict[str, ControlPlane]) -> None:
    """GrpcToolInvoker against a real filter service, frames inline and in shared memory: asked to omit, the answer
    is the header alone and no object is left in /dev/shm."""
    address = next(s.address for s in planes["inline"].tool_servers if s.kind == "filter")
    source = image_pb2.Image(data=sample("astronaut.jpg")).SerializeToString()
    before = {p.name for p in SHM_DIR.glob("imageflow-*")}
    for shared in (False, True):
        pool = ChannelPool(64 * 1024 * 1024)
        invoker = GrpcToolInvoker(pool, shared_memory=shared)
        try:
            for omit in (True, False):
                one = await invoker.process(address, tool_service_pb2.ProcessRequest(
                    tool="blur", output_media_type="image/x-raw", omit_output_image=omit), source, 30.0)  # fmt: skip
                steps: list[ToolResult] = []
                chain = await invoker.process_chain(address, [
                    tool_service_pb2.ProcessRequest(tool="grayscale"),
                    tool_service_pb2.ProcessRequest(tool="blur", output_media_type="image/x-raw",
                                                    omit_output_image=omit)],
                    source, 30.0, lambda _, result, __, into=steps: into.append(result))  # fmt: skip
                assert chain.failure is None and len(steps) == 2
                for result, channels in ((one, 3), (steps[-1], 1)):
                    assert (result.header.width, result.header.height) == (512, 512)
                    data = image_pb2.Image.FromString(bytes(inline(result.image))).data
                    assert len(data) == (0 if omit else 512 * 512 * channels), (shared, omit)
                steps.clear()  # SharedFrames unlink their objects when collected
                one = result = None  # type: ignore[assignment]
        finally:
            await pool.close()
    gc.collect()
    UNLINKER.settle()  # (off the caller's thread)
    assert {p.name for p in SHM_DIR.glob("imageflow-*")} <= before


async def test_a_tool_service_answers_an_omitted_image_with_its_header_alone(planes: dict[str, ControlPlane]) -> None:
    filter_address = next(s.address for s in planes["shm"].tool_servers if s.kind == "filter")
    detect_address = next(s.address for s in planes["shm"].tool_servers if s.kind == "detection")
    source = image_pb2.Image(data=sample("astronaut.jpg"))
    before = {p.name for p in SHM_DIR.glob("imageflow-*")}
    async with aio_channel(filter_address) as channel:
        stub = tool_service_pb2_grpc.ToolServiceStub(channel)
        one = await stub.Process(tool_service_pb2.ProcessRequest(
            tool="grayscale", image=source, output_media_type="image/x-raw", output_to_shared_memory=True,
            omit_output_image=True))  # fmt: skip
        chain = tool_service_pb2.ProcessChainRequest(
            image=source, steps=[tool_service_pb2.ChainStep(tool="grayscale"), tool_service_pb2.ChainStep(tool="blur")],
            output_media_type="image/png", omit_output_image=True)  # fmt: skip
        chained = await stub.ProcessChain(chain)
        head = tool_service_pb2.ProcessChainRequest()
        head.CopyFrom(chain)
        head.image.ClearField("data")  # the data follows in pieces
        streamed = [m async for m in stub.ProcessChainStream(iter([
            tool_service_pb2.ProcessChainStreamRequest(head=head, data_bytes=len(source.data)),
            tool_service_pb2.ProcessChainStreamRequest(data=source.data)]))]  # fmt: skip
        sent = await stub.Process(tool_service_pb2.ProcessRequest(tool="grayscale", image=source))
    async with aio_channel(detect_address) as channel:
        found = await tool_service_pb2_grpc.ToolServiceStub(channel).Process(
            tool_service_pb2.ProcessRequest(tool="detect", image=source, omit_output_image=True)
        )
    assert one.image == image_pb2.Image(media_type=RAW_GRAY, width=512, height=512)  # no data, no shared memory
    assert chained.image == image_pb2.Image(media_type="image/png", width=512, height=512)
    assert len(chained.results) == 2 and not chained.HasField("failure")
    assert len(streamed) == 1 and streamed[0].data_bytes == 0 and streamed[0].head.image == chained.image
    assert found.image.data == b"" and found.detections  # the boxes come; the picture does not
    assert sent.image.data.startswith(b"\xff\xd8")  # asked for nothing special: the image comes as before
    assert {p.name for p in SHM_DIR.glob("imageflow-*")} <= before


class Held:
    """A frame the executor can only hold or hand on; a weak reference tells whether it still holds it."""


class RecordingInvoker:
    """A tool that predates `omit_output_image`: answers every step with a frame, always; records what each request
    asked, and whether the unread branch's frame is still held when the join runs."""

    def __init__(self) -> None:
        self.omit: dict[str, bool] = {}
        self.unread_frame: weakref.ref[Held] | None = None
        self.held_at_join: bool | None = None

    def keeps_frames(self, address: str) -> bool:
        return False

    async def process(
        self, address: str, request: tool_service_pb2.ProcessRequest, image: Frame, timeout_s: float
    ) -> ToolResult:
        radius = request.params.fields.get("radius")
        self.omit[request.tool + (f"{radius.number_value:g}" if radius else "")] = request.omit_output_image
        if request.omit_output_image:  # sent all the same, as a service that predates the field does
            frame = Held()
            self.unread_frame = weakref.ref(frame)
            return ToolResult(frame, ImageHeader("image/x-raw-rgb8", 2, 2))  # type: ignore[arg-type]
        if request.tool == "grayscale":  # the join: the unread branch has finished
            gc.collect()
            self.held_at_join = self.unread_frame is not None and self.unread_frame() is not None
        out = image_pb2.Image(data=bytes(12), media_type="image/x-raw-rgb8", width=2, height=2)
        return ToolResult(out.SerializeToString(), ImageHeader("image/x-raw-rgb8", 2, 2))

    async def process_chain(self, address: str, requests: Sequence[tool_service_pb2.ProcessRequest], image: Frame,
                            timeout_s: float, on_step: StepCallback,
                            addresses: Sequence[str] | None = None) -> ChainOutcome:  # fmt: skip
        raise AssertionError("a diamond has no chain")


async def test_the_executor_asks_to_omit_only_unread_images_and_takes_an_image_sent_anyway(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    invoker = RecordingInvoker()
    hub = EventHub(store, [])
    executor = Executor(store, hub, invoker, lambda address: True, ExecutorLimits())  # type: ignore[arg-type]
    source = image_pb2.Image(data=bytes(12), media_type="image/x-raw-rgb8", width=2, height=2)
    execution_id, _ = await executor.start(compile_pipeline(pipeline(DIAMOND), TOOLS), {"image": source})
    events = [e async for e in hub.watch(execution_id, 0)]
    await store.close()
    finished = events[-1].execution_finished
    assert finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
    assert invoker.omit == {"flip": False, "blur2": False, "blur3": True, "grayscale": False}
    assert invoker.held_at_join is False  # the image sent anyway was dropped, not held to the end of the run
    assert [o.step_id for o in finished.outputs] == ["join"]


async def test_an_unread_step_that_fails_still_fails_the_execution(planes: dict[str, ControlPlane]) -> None:
    """Omitting the image changes what comes back, not whether the step runs: the unread branch failing at run time
    (its output would be 20000×20000) fails the execution and skips the join."""
    too_big = ("right", "resize", {"width": 20000, "height": 20000}, ["root"], {})
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=pipeline([*DIAMOND[:2], too_big, DIAMOND[3]]),
        inputs={"image": image_pb2.Image(data=sample("astronaut.jpg"))},
    )
    async with aio_channel(planes["inline"].address) as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        events = [r.event async for r in stub.ExecutePipeline(request)]
    failed = [e.step_failed for e in events if e.HasField("step_failed")]
    assert [(f.step_id, f.code) for f in failed] == [("right", "RESOURCE_EXHAUSTED")]
    assert "20000x20000" in failed[0].message
    assert "join" in [e.step_skipped.step_id for e in events if e.HasField("step_skipped")]
    assert not any(e.HasField("step_succeeded") and e.step_succeeded.step_id == "join" for e in events)
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_FAILED
