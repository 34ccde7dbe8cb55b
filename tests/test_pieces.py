"""Large images in pieces: ExecutePipelineUpload (client -> control plane) and ToolService.ProcessChainStream (control
plane <-> tool services) give the same bytes as the one-message calls, refuse pieces that do not add up with a clear
status, fall back for services and servers that predate them, and let the control plane drop a pipeline input once
its last reader has run."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from imageflow.client import sdk
from imageflow.client.sdk import AsyncImageflowClient, ImageflowClient, ImageflowClientError
from imageflow.common.errors import ImageflowError
from imageflow.common.pieces import Assembly, PieceError, pieces
from imageflow.common.structs import dict_to_struct
from imageflow.server.adapters import transport
from imageflow.server.adapters.api import pipeline_servicer
from imageflow.server.adapters.api.uploads import UploadBudget, UploadLimits
from imageflow.server.adapters.storage import open_store
from imageflow.server.adapters.transport import ChannelPool, GrpcToolInvoker, SharedFrame
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
from imageflow.server.domain.frames import Frame, ImageHeader, InputImage
from imageflow.server.settings import Settings
from imageflow.tools.server import ToolServer
from imageflow.v1 import (
    execution_pb2,
    image_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_service_pb2,
    tool_service_pb2_grpc,
)

from tests.conftest import Calls, aio_channel, sample
from tests.test_chains import Steps, definition, manifest

MIB = 1024 * 1024
Upload = pipeline_service_pb2.ExecutePipelineUploadRequest
StreamRequest = tool_service_pb2.ProcessChainStreamRequest


# --- the assembly --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mapped", [False, True], ids=["heap", "mapped"])
def test_pieces_fill_the_declared_length_after_the_prefix(mapped: bool) -> None:
    data = bytes(range(256)) * 1000
    assembly = Assembly(len(data), b"head", mapped=mapped)
    for piece in pieces(data, 999):
        assembly.add(piece)
    assert bytes(assembly.result()) == b"head" + data
    assert assembly.received == len(data)


@pytest.mark.parametrize("mapped", [False, True], ids=["heap", "mapped"])
def test_pieces_that_do_not_add_up_are_refused_with_the_counts(mapped: bool) -> None:
    short = Assembly(10, mapped=mapped)
    short.add(b"12345")
    with pytest.raises(PieceError, match="5 bytes received, 10 declared"):
        short.result()
    long = Assembly(4, mapped=mapped)
    with pytest.raises(PieceError, match="5 bytes received, 4 declared"):
        long.add(b"12345")
    with pytest.raises(PieceError, match="negative"):
        Assembly(-1)


def test_pieces_split_without_copying_and_cover_the_data() -> None:
    data = bytearray(b"x" * 10)
    parts = list(pieces(data, 4))
    assert [len(p) for p in parts] == [4, 4, 2]
    data[0] = ord("y")  # views, not copies
    assert bytes(parts[0])[:1] == b"y"
    assert list(pieces(b"", 4)) == []


# --- ToolService.ProcessChainStream --------------------------------------------------------------------------------


def _chain(image: bytes, *tools: tuple[str, dict[str, Any]], output: str = "") -> tool_service_pb2.ProcessChainRequest:
    return tool_service_pb2.ProcessChainRequest(
        image=image_pb2.Image(data=image),
        steps=[tool_service_pb2.ChainStep(tool=t, params=dict_to_struct(p)) for t, p in tools],
        output_media_type=output,
    )


def _streamed(request: tool_service_pb2.ProcessChainRequest, size: int = 4096) -> list[StreamRequest]:
    head = tool_service_pb2.ProcessChainRequest()
    head.CopyFrom(request)
    head.image.ClearField("data")
    data = request.image.data
    return [StreamRequest(head=head, data_bytes=len(data)), *(StreamRequest(data=bytes(p)) for p in pieces(data, size))]


async def _stream_call(
    address: str, messages: Sequence[StreamRequest]
) -> tuple[tool_service_pb2.ProcessChainResponse, bytes]:
    async with aio_channel(address) as channel:
        replies = [r async for r in tool_service_pb2_grpc.ToolServiceStub(channel).ProcessChainStream(iter(messages))]
    head, data = replies[0].head, b"".join(r.data for r in replies[1:])
    assert replies[0].data_bytes == len(data)
    return head, data


@pytest.mark.parametrize("output", ["", "image/x-raw"], ids=["encoded", "raw"])
async def test_a_streamed_chain_gives_the_same_response_as_process_chain(
    filter_service: ToolServer, output: str
) -> None:
    request = _chain(sample("astronaut.jpg"), ("grayscale", {}), ("blur", {"radius": 2}), output=output)
    async with aio_channel(filter_service.address) as channel:
        whole = await tool_service_pb2_grpc.ToolServiceStub(channel).ProcessChain(request)
    head, data = await _stream_call(filter_service.address, _streamed(request))
    assert data == whole.image.data and len(data) > 1000
    head.image.data = data
    for result in [*head.results, *whole.results]:
        result.ClearField("duration")
    assert head == whole


async def test_a_failing_step_in_a_streamed_chain_is_data_with_the_last_good_image(filter_service: ToolServer) -> None:
    request = _chain(sample("astronaut.jpg"), ("grayscale", {}), ("blur", {"radius": -5}))
    head, data = await _stream_call(filter_service.address, _streamed(request))
    assert head.failure.step_index == 1 and head.failure.code == "INVALID_ARGUMENT"
    assert head.image.media_type == "image/x-raw-gray8" and len(data) == head.image.width * head.image.height


@pytest.mark.parametrize(
    ("messages", "code", "reason"),
    [
        ([StreamRequest(data=b"xx")], grpc.StatusCode.INVALID_ARGUMENT, "STREAM_HEAD_MISSING"),
        ([], grpc.StatusCode.INVALID_ARGUMENT, "STREAM_HEAD_MISSING"),
        (
            [
                StreamRequest(head=_chain(b"", ("grayscale", {})), data_bytes=4),
                StreamRequest(head=_chain(b"", ("blur", {}))),
            ],
            grpc.StatusCode.INVALID_ARGUMENT,
            "STREAM_HEAD_REPEATED",
        ),
        (
            [StreamRequest(head=_chain(b"", ("grayscale", {})), data_bytes=4), StreamRequest(data=b"12345")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "5 bytes received, 4 declared",
        ),
        (
            [StreamRequest(head=_chain(b"", ("grayscale", {})), data_bytes=4), StreamRequest(data=b"12")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "2 bytes received, 4 declared",
        ),
        (
            [StreamRequest(head=_chain(b"inline", ("grayscale", {})), data_bytes=4)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "head.image.data must be empty",
        ),
        (
            [StreamRequest(head=_chain(b"", ("grayscale", {})), data_bytes=65 * MIB)],
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"over the limit of {64 * MIB} bytes",
        ),
        (
            [StreamRequest(head=_chain(b"", ("grayscale", {})), data_bytes=-4)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "declared length -4 is negative",
        ),
    ],
    ids=[
        "no-head",
        "empty",
        "second-head",
        "too-many-bytes",
        "too-few-bytes",
        "inline-data",
        "over-the-limit",
        "negative-length",
    ],
)
async def test_a_stream_that_does_not_add_up_is_refused(
    filter_service: ToolServer, messages: list[StreamRequest], code: grpc.StatusCode, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _stream_call(filter_service.address, messages)
    assert refused.value.code() == code
    assert reason in (refused.value.details() or "") or reason in str(refused.value.trailing_metadata())


# --- the control plane's invoker -----------------------------------------------------------------------------------


class OnlyUnary(tool_service_pb2_grpc.ToolServiceServicer):
    """A third-party service that predates ProcessChainStream: Process and ProcessChain only (relayed to a real one)."""

    def __init__(self, target: str) -> None:
        self.stub = tool_service_pb2_grpc.ToolServiceStub(aio_channel(target))
        self.calls: list[str] = []

    async def Process(self, request: Any, context: Any) -> tool_service_pb2.ProcessResponse:
        self.calls.append("Process")
        return await self.stub.Process(request)  # type: ignore[no-any-return]

    async def ProcessChain(self, request: Any, context: Any) -> tool_service_pb2.ProcessChainResponse:
        self.calls.append("ProcessChain")
        return await self.stub.ProcessChain(request)  # type: ignore[no-any-return]


async def _invoke(
    invoker: GrpcToolInvoker, address: str, image: bytes, chain: bool
) -> tuple[image_pb2.Image, ImageHeader, list[int]]:
    frame = image_pb2.Image(data=image).SerializeToString()
    if not chain:
        request = tool_service_pb2.ProcessRequest(
            tool="sharpen", params=dict_to_struct({}), output_media_type="image/png"
        )
        result = await invoker.process(address, request, frame, 30)
        return image_pb2.Image.FromString(bytes(result.image)), result.header, [0]
    requests = [
        tool_service_pb2.ProcessRequest(tool="grayscale", params=dict_to_struct({}), output_media_type="image/x-raw"),
        tool_service_pb2.ProcessRequest(tool="sharpen", params=dict_to_struct({}), output_media_type="image/png"),
    ]
    seen: list[tuple[int, ToolResult]] = []
    outcome = await invoker.process_chain(address, requests, frame, 30, lambda i, r, s: seen.append((i, r)))
    assert outcome.failure is None
    return image_pb2.Image.FromString(bytes(seen[-1][1].image)), seen[-1][1].header, [i for i, _ in seen]


@pytest.mark.parametrize("chain", [False, True], ids=["process", "chain"])
async def test_the_invoker_streams_large_frames_with_the_same_result(
    counted_filter: tuple[str, Calls], chain: bool
) -> None:
    address, calls = counted_filter
    image = sample("chelsea.jpg")
    pool = ChannelPool(64 * MIB)
    try:
        whole = await _invoke(GrpcToolInvoker(pool, stream_bytes=0, streams=lambda a: True), address, image, chain)
        assert "ProcessChainStream" not in calls.methods
        streaming = GrpcToolInvoker(pool, stream_bytes=1024, streams=lambda a: True)
        streamed = await _invoke(streaming, address, image, chain)
        assert calls.methods[-1] == "ProcessChainStream"
        not_told = await _invoke(GrpcToolInvoker(pool, stream_bytes=1024), address, image, chain)  # manifest says no
        small = await _invoke(
            GrpcToolInvoker(pool, stream_bytes=len(image) + 100, streams=lambda a: True), address, image, chain
        )
    finally:
        await pool.close()
    assert calls.methods.count("ProcessChainStream") == 1  # not without the manifest's word, nor under the threshold
    assert streamed == whole == not_told == small
    assert whole[1].media_type == "image/png" and whole[2] == ([0, 1] if chain else [0])


def _old_build(relay: OnlyUnary) -> grpc.GenericRpcHandler:
    """The handlers of a service built before ProcessChainStream existed: the method is not there at all."""
    serializers = {
        "Process": (tool_service_pb2.ProcessRequest, tool_service_pb2.ProcessResponse),
        "ProcessChain": (tool_service_pb2.ProcessChainRequest, tool_service_pb2.ProcessChainResponse),
    }
    return grpc.method_handlers_generic_handler(
        "imageflow.v1.ToolService",
        {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(relay, name), request_deserializer=req.FromString, response_serializer=res.SerializeToString
            )
            for name, (req, res) in serializers.items()
        },
    )


async def start_old_build(relay: OnlyUnary, calls: Calls) -> tuple[grpc.aio.Server, str]:
    """A service built before ProcessChainStream and ProcessBranches, on a loopback port; its calls counted."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * MIB)], interceptors=[calls])
    server.add_generic_rpc_handlers((_old_build(relay),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("says_it_streams", [False, True], ids=["manifest-says-no", "old-build-behind-the-manifest"])
@pytest.mark.parametrize("chain", [False, True], ids=["process", "chain"])
async def test_a_service_without_the_stream_is_called_the_unary_way(
    filter_service: ToolServer, chain: bool, says_it_streams: bool
) -> None:
    relay, calls = OnlyUnary(filter_service.address), Calls()
    server, address = await start_old_build(relay, calls)
    pool = ChannelPool(64 * MIB)
    invoker = GrpcToolInvoker(pool, stream_bytes=1024, streams=lambda address: says_it_streams)
    try:
        image = sample("chelsea.jpg")
        first = await _invoke(invoker, address, image, chain)
        second = await _invoke(invoker, address, image, chain)
        expected = await _invoke(GrpcToolInvoker(pool, stream_bytes=0), filter_service.address, image, chain)
    finally:
        await pool.close()
        await server.stop(0.1)
    assert first == second == expected
    unary = "ProcessChain" if chain else "Process"
    assert relay.calls == [unary, unary]
    # told it streams, the invoker tries once, gets UNIMPLEMENTED (the method is not there) and remembers it
    assert calls.methods == (["ProcessChainStream", unary, unary] if says_it_streams else [unary, unary])


async def test_the_reference_services_take_frames_in_pieces_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loopback tool services: a control plane that sends every frame over 1 KiB to them in pieces, against one that
    never does; both get the input uploaded."""
    streamed: list[str] = []
    exchange = GrpcToolInvoker._exchange_pieces

    async def spy(self: GrpcToolInvoker, address: str, *args: Any) -> Any:
        streamed.append(address)
        return await exchange(self, address, *args)

    monkeypatch.setattr(GrpcToolInvoker, "_exchange_pieces", spy)
    made = []
    for name, stream_bytes in (("pieces", 1024), ("whole", 0)):
        made.append(
            await start_control_plane(
                Settings(
                    host="127.0.0.1", port=0, database_url=f"sqlite:///{tmp_path / name}", embedded_in_process=False,
                    tool_stream_bytes=stream_bytes,
                )
            )
        )  # fmt: skip
    image = sample("astronaut.jpg")
    steps = [("mirror", "flip", {"direction": "horizontal"}, []), ("soft", "blur", {"radius": 2}, ["mirror"])]
    outputs = []
    try:
        for plane in made:
            assert all(plane.registry.streams_frames(server.address) for server in plane.tool_servers)
            streamed.clear()
            async with aio_channel(plane.address) as channel:
                stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
                events = [r.event async for r in stub.ExecutePipelineUpload(_upload(image, pipeline=definition(steps)))]
            assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED, events[-1]
            outputs.append(events[-1].execution_finished.outputs[0].image.data)
            tool_addresses = {server.address for server in plane.tool_servers}
            if plane is made[0]:  # both steps' frames (flip on resize, blur on filter) went in pieces
                assert len(streamed) == 2 and set(streamed) <= tool_addresses, streamed
            else:
                assert streamed == []
    finally:
        for plane in made:
            await plane.stop(0.1)
    assert outputs[0] == outputs[1] and len(outputs[0]) > 1000


# --- ExecutePipelineUpload -----------------------------------------------------------------------------------------

FLIP_GRAY = definition([("mirror", "flip", {"direction": "horizontal"}, []), ("gray", "grayscale", {}, ["mirror"])])


def _upload(
    image: bytes, size: int = 50_000, pipeline: pipeline_pb2.Pipeline = FLIP_GRAY, **head: Any
) -> Iterator[Upload]:
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=pipeline, inputs={"image": image_pb2.Image()}, **head
    )
    yield Upload(head=request, input_bytes={"image": len(image)})
    for piece in pieces(image, size):
        yield Upload(piece=pipeline_service_pb2.InputPiece(input="image", data=bytes(piece)))


async def test_an_uploaded_input_runs_like_one_sent_whole(
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub,
) -> None:
    image = sample("coffee.jpg")
    whole = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=FLIP_GRAY, inputs={"image": image_pb2.Image(data=image)}
    )
    one = [r.event async for r in pipelines.ExecutePipeline(whole)]
    uploaded = [r.event async for r in pipelines.ExecutePipelineUpload(_upload(image))]
    assert [e.WhichOneof("kind") for e in uploaded] == [e.WhichOneof("kind") for e in one]
    done = uploaded[-1].execution_finished
    assert done.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
    assert done.outputs[0].image.data == one[-1].execution_finished.outputs[0].image.data


async def test_an_upload_can_batch_its_events(pipelines: pipeline_service_pb2_grpc.PipelineServiceStub) -> None:
    replies = [r async for r in pipelines.ExecutePipelineUpload(_upload(sample("coffee.jpg"), batch_events=True))]
    events = [e for r in replies for e in r.events]
    assert not any(r.HasField("event") for r in replies)
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED


def _head(inputs: dict[str, image_pb2.Image], lengths: dict[str, int]) -> Upload:
    request = pipeline_service_pb2.ExecutePipelineRequest(pipeline=FLIP_GRAY, inputs=inputs)
    return Upload(head=request, input_bytes=lengths)


def _piece(name: str, data: bytes) -> Upload:
    return Upload(piece=pipeline_service_pb2.InputPiece(input=name, data=data))


EMPTY = image_pb2.Image()


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([_piece("image", b"x")], "the first message must carry `head`"),
        ([], "the stream ended before `head`"),
        ([_head({"image": EMPTY}, {"image": 3}), _head({"image": EMPTY}, {"image": 3})], "only the first message"),
        ([_head({"image": EMPTY}, {})], "input_bytes['image'] is missing"),
        ([_head({"image": EMPTY}, {"image": 3, "other": 2})], "input_bytes names 'other'"),
        ([_head({"image": EMPTY}, {"image": 0})], "input_bytes['image'] is 0"),
        ([_head({"image": image_pb2.Image(data=b"abc")}, {"image": 3})], "carries its data"),
        ([_head({"image": EMPTY}, {"image": 3}), _piece("other", b"abc")], "a piece names input 'other'"),
        (
            [_head({"image": EMPTY}, {"image": 3}), _piece("image", b"abcd")],
            "input 'image': 4 bytes received, 3 declared",
        ),
        (
            [_head({"image": EMPTY}, {"image": 3}), _piece("image", b"ab")],
            "input 'image': 2 bytes received, 3 declared",
        ),
    ],
    ids=[
        "piece-first",
        "empty",
        "second-head",
        "no-length",
        "length-without-input",
        "zero-length",
        "inline-data",
        "unknown-input",
        "too-many-bytes",
        "too-few-bytes",
    ],
)
async def test_an_upload_that_does_not_add_up_is_refused(
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub, messages: list[Upload], reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        [r async for r in pipelines.ExecutePipelineUpload(iter(messages))]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (refused.value.details() or "")


async def test_an_undecodable_upload_message_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    call = channel.stream_stream("/imageflow.v1.PipelineService/ExecutePipelineUpload")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        [r async for r in call(iter([b"\xff\xff\xff"]))]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in (refused.value.details() or "")


async def test_an_upload_over_the_limit_is_refused_before_a_byte_is_kept(tmp_path: Path) -> None:
    plane = await start_control_plane(
        Settings(host="127.0.0.1", port=0, database_url=f"sqlite:///{tmp_path / 'db'}", max_upload_bytes=50_000)
    )
    try:
        async with aio_channel(plane.address) as channel:
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [r async for r in stub.ExecutePipelineUpload(_upload(sample("coffee.jpg")))]
    finally:
        await plane.stop(0.1)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the limit of 50000 bytes (IMAGEFLOW_MAX_UPLOAD_BYTES)" in (refused.value.details() or "")


async def test_a_refusal_in_the_middle_of_a_large_upload_reaches_the_client_as_it_is(
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub,
) -> None:
    """The server reads what the client still sends before it answers (a grpc.aio client writing when the call ends
    would see INTERNAL instead)."""
    image = b"x" * (4 * MIB)
    messages = [*_upload(image, size=64 * 1024)]
    messages.insert(3, _piece("other", b"abc"))  # a piece for an undeclared input, early among 64 others
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        [r async for r in pipelines.ExecutePipelineUpload(iter(messages))]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a piece names input 'other'" in (refused.value.details() or "")


async def test_an_input_the_pipeline_does_not_read_is_counted_not_kept(
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub,
) -> None:
    image = sample("coffee.jpg")
    head = _head({"image": EMPTY, "unused": EMPTY}, {"image": len(image), "unused": 5})
    messages = [
        head,
        _piece("unused", b"12"),
        *(_piece("image", bytes(p)) for p in pieces(image)),
        _piece("unused", b"345"),
    ]
    events = [r.event async for r in pipelines.ExecutePipelineUpload(iter(messages))]
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
    short = [head, *(_piece("image", bytes(p)) for p in pieces(image)), _piece("unused", b"12")]
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # counted all the same
        [r async for r in pipelines.ExecutePipelineUpload(iter(short))]
    assert "input 'unused': 2 bytes received, 5 declared" in (refused.value.details() or "")


def test_the_upload_budget_names_its_limit_and_gives_back() -> None:
    budget = UploadBudget(UploadLimits(max_in_flight=100))
    budget.reserve(60)
    with pytest.raises(ImageflowError) as refused:
        budget.reserve(50)
    assert refused.value.reason == "UPLOADS_BUSY"
    assert "hold 60 bytes and this one declares 50: over the limit of 100 bytes" in refused.value.message
    budget.release(60)
    budget.reserve(100)
    assert budget.held == 100


@pytest.mark.parametrize("ask", [False, True], ids=["without-go-ahead", "with-go-ahead"])
async def test_uploads_in_flight_share_one_budget_and_an_idle_upload_ends(tmp_path: Path, ask: bool) -> None:
    """With the go-ahead too: an upload that had it and then sends nothing holds its bytes until it goes idle, and
    gives them back; one refused at its head (busy) holds nothing."""
    plane = await start_control_plane(
        Settings(
            host="127.0.0.1", port=0, database_url=f"sqlite:///{tmp_path / 'db'}", max_upload_bytes=150_000,
            max_upload_bytes_in_flight=150_000, upload_idle_s=0.5,
        )
    )  # fmt: skip
    image = sample("coffee.jpg")  # 80 KB: one upload fits the budget, two at once do not
    try:
        async with aio_channel(plane.address) as channel:
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            before = [r.event async for r in stub.ExecutePipelineUpload(_upload(image))]  # gives its bytes back too
            holding = stub.ExecutePipelineUpload()
            head = _head({"image": EMPTY}, {"image": len(image)})
            head.await_go_ahead = ask
            await holding.write(head)  # then nothing: it holds its bytes
            if ask:
                assert (await holding.read()).go_ahead
            else:
                await asyncio.sleep(0.2)
            with pytest.raises(grpc.aio.AioRpcError) as busy:
                if ask:  # the head alone, then the answer
                    refused = stub.ExecutePipelineUpload()
                    await refused.write(head)
                    await refused.read()
                else:
                    [r async for r in stub.ExecutePipelineUpload(_upload(image))]
            with pytest.raises(grpc.aio.AioRpcError) as idle:
                while True:  # the go-ahead already read: read() alone, as the API asks
                    if not isinstance(await holding.read(), pipeline_service_pb2.ExecutePipelineUploadResponse):
                        break
            after = [r.event async for r in stub.ExecutePipelineUpload(_upload(image))]  # the budget came back
    finally:
        await plane.stop(0.1)
    assert before[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the limit of 150000 bytes in flight" in (busy.value.details() or "")
    assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no message for 0.5 s" in (idle.value.details() or "")
    assert after[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED


async def _drain_replies(call: Any) -> None:
    async for _ in call:
        pass


async def test_a_trickling_upload_ends_when_it_falls_below_the_minimum_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline_servicer, "MIN_RATE", 100_000)  # 80 KB: 0.5 s of slack plus 0.8 s
    plane = await start_control_plane(
        Settings(host="127.0.0.1", port=0, database_url=f"sqlite:///{tmp_path / 'db'}", upload_idle_s=0.5)
    )
    image = sample("coffee.jpg")
    try:
        async with aio_channel(plane.address) as channel:
            call = pipeline_service_pb2_grpc.PipelineServiceStub(channel).ExecutePipelineUpload()
            await call.write(_head({"image": EMPTY}, {"image": len(image)}))
            began = asyncio.get_running_loop().time()
            with pytest.raises(grpc.aio.AioRpcError) as slow:  # a byte every 0.3 s: never idle, always too slow
                for offset in range(20):
                    await asyncio.sleep(0.3)
                    if call.done():
                        break
                    await call.write(_piece("image", image[offset : offset + 1]))
                await asyncio.wait_for(_drain_replies(call), 10)
            took = asyncio.get_running_loop().time() - began
    finally:
        await plane.stop(0.1)
    assert slow.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "slower than 97 KiB/s on the whole" in (slow.value.details() or "")
    assert took < 3.0


async def test_both_streams_accept_the_call_before_they_read(
    channel: grpc.aio.Channel, counted_filter: tuple[str, Calls]
) -> None:
    """The contract a client relies on to write only once it knows the call is taken."""
    upload = pipeline_service_pb2_grpc.PipelineServiceStub(channel).ExecutePipelineUpload()
    async with aio_channel(counted_filter[0]) as tool_channel:
        chain = tool_service_pb2_grpc.ToolServiceStub(tool_channel).ProcessChainStream()
        for call in (upload, chain):
            await asyncio.wait_for(call.initial_metadata(), 2)  # nothing written yet
            assert not call.done()
            call.cancel()


async def test_a_tool_refusing_a_stream_part_way_answers_after_reading_it(filter_service: ToolServer) -> None:
    refused = [StreamRequest(head=_chain(b"inline", ("grayscale", {})), data_bytes=4 * MIB)]
    refused += [StreamRequest(data=b"x" * 65536) for _ in range(64)]  # the caller keeps writing after the head
    with pytest.raises(grpc.aio.AioRpcError) as answer:
        await _stream_call(filter_service.address, refused)
    assert answer.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "head.image.data must be empty" in (answer.value.details() or "")


async def test_an_undecodable_message_among_pieces_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    image = b"y" * (4 * MIB)
    messages = [m.SerializeToString() for m in _upload(image, size=64 * 1024)]
    messages.insert(2, b"\xff\xff\xff")  # not a message, with 63 pieces still to come
    call = channel.stream_stream("/imageflow.v1.PipelineService/ExecutePipelineUpload")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        [r async for r in call(iter(messages))]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in (refused.value.details() or "")


def test_a_frame_is_measured_by_what_travels() -> None:
    handle = image_pb2.Image(media_type="image/x-raw-rgb8", width=7680, height=4320)
    handle.shared_memory.name, handle.shared_memory.byte_size = "imageflow-" + "0" * 32, 7680 * 4320 * 3
    shared = SharedFrame(
        handle.SerializeToString(), ImageHeader("image/x-raw-rgb8", 7680, 4320), "imageflow-" + "0" * 32
    )
    assert transport._frame_bytes(shared) < 100  # a handle, whatever the frame's size

    class Pixels:  # a frame kept decoded in this process: measured without being serialized
        header = ImageHeader("image/x-raw-gray8", 100, 50)

        def serialized(self) -> bytes:
            raise AssertionError("serialized just to be measured")

    assert transport._frame_bytes(Pixels()) == 5000  # type: ignore[arg-type]
    assert transport._frame_bytes(b"12345") == 5


def _stream_tool(*replies: bytes) -> grpc.GenericRpcHandler:
    """A tool service whose ProcessChainStream reads the request and answers these raw messages."""

    async def answer(requests: Any, context: Any) -> AsyncIterator[bytes]:
        await context.send_initial_metadata(())
        async for _ in requests:
            pass
        for reply in replies:
            yield reply

    handler = grpc.stream_stream_rpc_method_handler(answer)
    return grpc.method_handlers_generic_handler("imageflow.v1.ToolService", {"ProcessChainStream": handler})


def _reply(**fields: Any) -> bytes:
    return tool_service_pb2.ProcessChainStreamResponse(**fields).SerializeToString()


@pytest.mark.parametrize(
    ("replies", "message"),
    [
        ([_reply(data=b"abc")], "the first message has no head"),
        ([], "ended ProcessChainStream without a head"),
        ([_reply(head=tool_service_pb2.ProcessChainResponse(), data_bytes=2 * MIB)], "over the limit of 1048576"),
        ([_reply(head=tool_service_pb2.ProcessChainResponse(), data_bytes=10), _reply(data=b"abc")], "a short image"),
        (
            [_reply(head=tool_service_pb2.ProcessChainResponse(), data_bytes=2), _reply(data=b"abc")],
            "3 bytes received, 2 declared",
        ),
    ],
    ids=["no-head", "nothing", "over-the-limit", "short", "long"],
)
async def test_a_malformed_streamed_answer_is_internal_naming_the_tool(replies: list[bytes], message: str) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_stream_tool(*replies),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    pool = ChannelPool(64 * MIB)
    invoker = GrpcToolInvoker(pool, stream_bytes=1, streams=lambda a: True, max_frame_bytes=MIB)
    try:
        with pytest.raises(ToolCallError) as failed:
            await _invoke(invoker, f"127.0.0.1:{port}", sample("chelsea.jpg"), chain=True)
    finally:
        await pool.close()
        await server.stop(0)
    assert failed.value.code == "INTERNAL"
    assert message in failed.value.message and f"127.0.0.1:{port}" in failed.value.message


# --- the SDK ---------------------------------------------------------------------------------------------------------


class RecordingPipelines(pipeline_service_pb2_grpc.PipelineServiceServicer):
    """Answers ExecutePipeline and ExecutePipelineUpload with a finished event whose message is the input's length;
    records which was called, the upload's head and its pieces' sizes."""

    def __init__(self, accepts_first: bool = True) -> None:
        self.accepts_first = accepts_first
        self.calls: list[str] = []
        self.declared: dict[str, int] = {}
        self.piece_sizes: list[int] = []

    @staticmethod
    def _finished(length: int) -> execution_pb2.ExecutionEvent:
        return execution_pb2.ExecutionEvent(
            execution_finished=execution_pb2.ExecutionFinished(
                state=execution_pb2.EXECUTION_STATE_SUCCEEDED, message=str(length)
            )
        )

    def ExecutePipeline(self, request: Any, context: Any) -> Iterator[pipeline_service_pb2.ExecutePipelineResponse]:
        self.calls.append("ExecutePipeline")
        yield pipeline_service_pb2.ExecutePipelineResponse(events=[self._finished(len(request.inputs["image"].data))])

    def ExecutePipelineUpload(
        self, requests: Iterator[Upload], context: Any
    ) -> Iterator[pipeline_service_pb2.ExecutePipelineUploadResponse]:
        self.calls.append("ExecutePipelineUpload")
        if self.accepts_first:
            context.send_initial_metadata(())  # as the contract asks
        received = b""
        for message in requests:
            if message.HasField("head"):
                self.declared = dict(message.input_bytes)
                assert not message.head.inputs["image"].data
            else:
                self.piece_sizes.append(len(message.piece.data))
                received += message.piece.data
        yield pipeline_service_pb2.ExecutePipelineUploadResponse(events=[self._finished(len(received))])


def _pipelines_server(servicer: RecordingPipelines, legacy: bool) -> tuple[grpc.Server, int]:
    """A sync gRPC server; `legacy` registers ExecutePipeline alone (a server built before the upload existed)."""
    server = grpc.server(futures.ThreadPoolExecutor(4))
    if legacy:
        handler = grpc.unary_stream_rpc_method_handler(
            servicer.ExecutePipeline,
            request_deserializer=pipeline_service_pb2.ExecutePipelineRequest.FromString,
            response_serializer=pipeline_service_pb2.ExecutePipelineResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("imageflow.v1.PipelineService", {"ExecutePipeline": handler}),)
        )
    else:
        pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.mark.parametrize(
    ("legacy", "accepts_first"),
    [(False, True), (False, False), (True, True)],
    ids=["current", "does-not-accept-first", "predates-upload"],
)
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_the_sdk_uploads_large_inputs_in_pieces(
    legacy: bool, accepts_first: bool, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sdk, "UPLOAD_BYTES", 100_000)
    monkeypatch.setattr(sdk, "ACCEPT_WAIT_S", 0.2)
    servicer = RecordingPipelines(accepts_first)
    server, port = _pipelines_server(servicer, legacy)
    small, large = image_pb2.Image(data=b"s" * 1000), image_pb2.Image(data=b"L" * 300_000)
    try:
        if kind == "sync":

            def both() -> list[list[execution_pb2.ExecutionEvent]]:
                with ImageflowClient(f"127.0.0.1:{port}") as client:
                    return [list(client.execute(FLIP_GRAY, {"image": image})) for image in (small, large)]

            runs = await asyncio.to_thread(both)
        else:
            async with AsyncImageflowClient(f"127.0.0.1:{port}") as client:
                runs = [[e async for e in client.execute(FLIP_GRAY, {"image": image})] for image in (small, large)]
    finally:
        server.stop(0)
    assert [run[-1].execution_finished.message for run in runs] == ["1000", "300000"]
    assert servicer.calls == ["ExecutePipeline", "ExecutePipeline" if legacy else "ExecutePipelineUpload"]
    if not legacy:
        assert servicer.declared == {"image": 300_000}
        assert max(servicer.piece_sizes) == 64 * 1024 and sum(servicer.piece_sizes) == 300_000


async def test_the_async_sdk_gets_a_refusal_as_it_is_while_uploading(tmp_path: Path) -> None:
    """A refusal at the head of a large upload reaches a grpc.aio client as its own status, not INTERNAL."""
    plane = await start_control_plane(
        Settings(host="127.0.0.1", port=0, database_url=f"sqlite:///{tmp_path / 'db'}", max_upload_bytes=1_000_000)
    )
    try:
        async with AsyncImageflowClient(plane.address) as client:
            with pytest.raises(ImageflowClientError) as refused:
                [e async for e in client.execute(FLIP_GRAY, {"image": image_pb2.Image(data=b"x" * 20 * MIB)})]
    finally:
        await plane.stop(0.1)
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    assert "over the limit of 1000000 bytes" in refused.value.message


# --- releasing inputs ------------------------------------------------------------------------------------------------


class Tracked(bytearray):
    """A buffer a weak reference can watch."""


class GatedInvoker:
    """Every step answers at once but `gated`, which waits until the test has looked at what the control plane still
    holds; chains (when the compiler makes them) answer each step at once too."""

    def __init__(self) -> None:
        self.b_started = asyncio.Event()
        self.go_on = asyncio.Event()

    def keeps_frames(self, address: str) -> bool:
        return False

    async def process(
        self, address: str, request: tool_service_pb2.ProcessRequest, image: Frame, timeout_s: float
    ) -> ToolResult:
        out = image_pb2.Image(data=b"\x01\x02\x03", media_type="image/x-raw-rgb8", width=1, height=1)
        if request.tool == "gated":
            self.b_started.set()
            await self.go_on.wait()
        return ToolResult(out.SerializeToString(), ImageHeader("image/x-raw-rgb8", 1, 1))

    async def process_chain(
        self, address: str, requests: Sequence[tool_service_pb2.ProcessRequest], image: Frame, timeout_s: float,
        on_step: StepCallback, addresses: Sequence[str] | None = None,
    ) -> ChainOutcome:  # fmt: skip
        out = image_pb2.Image(data=b"\x01\x02\x03", media_type="image/x-raw-rgb8", width=1, height=1)
        for index in range(len(requests)):
            on_step(index, ToolResult(out.SerializeToString(), ImageHeader("image/x-raw-rgb8", 1, 1)), 0.001)
        return ChainOutcome(len(requests))


@pytest.mark.parametrize(
    "steps",
    [
        [("a", "a", {}, []), ("gated", "gated", {}, ["a"])],
        [("a", "a", {}, []), ("b", "b", {}, ["a"]), ("gated", "gated", {}, ["b"])],  # a -> b travel as one chain
        [("a", "a", {}, []), ("c", "c", {}, []), ("gated", "gated", {}, ["a", "c"])],  # two readers
    ],
    ids=["one-reader", "chain-head", "two-readers"],
)
async def test_a_pipeline_input_is_released_once_its_last_reader_has_run(tmp_path: Path, steps: Steps) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    hub = EventHub(store, [])
    invoker = GatedInvoker()
    executor = Executor(store, hub, invoker, lambda address: True, ExecutorLimits())  # type: ignore[arg-type]
    tools = {name: manifest(name, "fake:2" if name == "gated" else "fake:1") for name in ("a", "b", "c", "gated")}
    compiled = compile_pipeline(definition(steps), tools)
    assert len(compiled.chains) == (1 if len(steps) == 3 and steps[1][0] == "b" else 0)
    buffer = Tracked(
        image_pb2.Image(data=b"\x09" * 3, media_type="image/x-raw-rgb8", width=1, height=1).SerializeToString()
    )
    watch = weakref.ref(buffer)
    raw = InputImage(buffer, buffer, "image/x-raw-rgb8", 1, 1)  # type: ignore[arg-type]
    execution_id, _ = await executor.start(compiled, {"image": raw})
    del buffer, raw
    await asyncio.wait_for(invoker.b_started.wait(), 10)
    gc.collect()
    released = watch() is None
    invoker.go_on.set()
    events = [e async for e in hub.watch(execution_id, 0)]
    await store.close()
    assert released, "the input outlived its only reader"
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED


# --- the go-ahead ----------------------------------------------------------------------------------------------------


async def test_a_head_that_asks_is_answered_go_ahead_before_any_piece(channel: grpc.aio.Channel) -> None:
    """The server says in its initial metadata that it answers; an accepted head gets `go_ahead` alone, then the run's
    events follow the pieces; a refused head gets its status and no go-ahead, with no piece sent."""
    stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
    image = sample("coffee.jpg")
    messages = list(_upload(image))
    messages[0].await_go_ahead = True
    call = stub.ExecutePipelineUpload()
    assert ("imageflow-go-ahead", "1") in list(await call.initial_metadata())
    await call.write(messages[0])
    first = await call.read()
    assert first == pipeline_service_pb2.ExecutePipelineUploadResponse(go_ahead=True)
    for message in messages[1:]:
        await call.write(message)
    await call.done_writing()
    events = []
    while isinstance(reply := await call.read(), pipeline_service_pb2.ExecutePipelineUploadResponse):
        assert not reply.go_ahead  # once only
        events.append(reply.event)
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED

    head = Upload(
        head=pipeline_service_pb2.ExecutePipelineRequest(pipeline_id="pl_missing"),
        input_bytes={"image": 20 * MIB},
        await_go_ahead=True,
    )
    refused = stub.ExecutePipelineUpload()
    await refused.write(head)  # the head alone, the call left open: the answer comes without a piece or a close
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(refused.read(), 5)  # a refusal that read on first would hold it for 10 s
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_the_sdk_sends_no_piece_of_a_refused_upload(
    kind: str, plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 MiB to an unknown pipeline: refused at the head, nothing more sent; an accepted upload still runs."""
    cut: list[int] = []

    def counted(data: bytes) -> Iterator[memoryview]:
        for piece in pieces(data):
            cut.append(len(piece))
            yield piece

    monkeypatch.setattr(sdk, "pieces", counted)
    monkeypatch.setattr(sdk, "UPLOAD_BYTES", 50_000)  # coffee.jpg (80 KB) goes in pieces too
    big = image_pb2.Image(data=b"x" * 20 * MIB)
    photo = image_pb2.Image(data=sample("coffee.jpg"))

    if kind == "sync":

        def both() -> tuple[ImageflowClientError, list[execution_pb2.ExecutionEvent]]:
            with ImageflowClient(plane.address) as client:
                with pytest.raises(ImageflowClientError) as refused:
                    list(client.execute("pl_missing", {"image": big}))
                return refused.value, list(client.execute(FLIP_GRAY, {"image": photo}))

        error, events = await asyncio.to_thread(both)
    else:
        async with AsyncImageflowClient(plane.address) as client:
            with pytest.raises(ImageflowClientError) as refused:
                [e async for e in client.execute("pl_missing", {"image": big})]
            error = refused.value
            cut_before = len(cut)
            assert cut_before == 0
            events = [e async for e in client.execute(FLIP_GRAY, {"image": photo})]
    assert error.code == "NOT_FOUND"
    assert events[-1].execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
    assert all(event.WhichOneof("kind") for event in events)  # the go-ahead is not handed out as an event
    assert sum(cut) == len(photo.data)  # only the accepted upload's pieces were cut (and so sent)


class BrokenGoAhead(RecordingPipelines):
    """Offers the go-ahead, then answers a head that asks for it with an event."""

    def ExecutePipelineUpload(
        self, requests: Iterator[Upload], context: Any
    ) -> Iterator[pipeline_service_pb2.ExecutePipelineUploadResponse]:
        context.send_initial_metadata((("imageflow-go-ahead", "1"),))
        head = next(requests)
        self.declared = {"asked": int(head.await_go_ahead)}
        yield pipeline_service_pb2.ExecutePipelineUploadResponse(events=[self._finished(0)])


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_server_that_breaks_its_go_ahead_is_an_error_not_a_hang(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sdk, "UPLOAD_BYTES", 100_000)
    servicer = BrokenGoAhead()
    server, port = _pipelines_server(servicer, legacy=False)
    large = image_pb2.Image(data=b"L" * 300_000)
    try:
        if kind == "sync":

            def run() -> None:
                with ImageflowClient(f"127.0.0.1:{port}") as client:
                    list(client.execute(FLIP_GRAY, {"image": large}))

            with pytest.raises(ImageflowClientError) as broken:
                await asyncio.wait_for(asyncio.to_thread(run), 20)
        else:
            async with AsyncImageflowClient(f"127.0.0.1:{port}") as client:
                with pytest.raises(ImageflowClientError) as broken:
                    await asyncio.wait_for(_all(client.execute(FLIP_GRAY, {"image": large})), 20)
    finally:
        server.stop(0)
    assert servicer.declared == {"asked": 1}
    assert broken.value.code == "INTERNAL" and "answered its head with something else" in broken.value.message


async def _all(events: AsyncIterator[execution_pb2.ExecutionEvent]) -> list[execution_pb2.ExecutionEvent]:
    return [event async for event in events]


def test_a_server_that_kept_an_upload_waiting_is_not_waited_for_again_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acceptance = sdk._Acceptance()
    assert acceptance.waits()
    acceptance.late()
    assert not acceptance.waits()
    monkeypatch.setattr(sdk, "LATE_RECHECK_S", 0.0)
    acceptance.late()
    assert acceptance.waits()  # the recheck is due
