"""gRPC transport to tool services: one long-lived channel per address, shared by every execution."""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError, Message
from imageflow.common.errors import unavailable
from imageflow.common.grpc_errors import error_reason
from imageflow.common.media import RAW_ANY, RAW_GRAY, RAW_TYPES
from imageflow.common.pieces import Assembly, PieceError, pieces
from imageflow.common.serving import channel_options
from imageflow.common.shm import UNLINKER, read_region
from imageflow.common.wire import LENGTH_DELIMITED, VARINT, encode_varint, fields, length_delimited, split_field
from imageflow.server.adapters.wire import image_header
from imageflow.server.domain.executor import (
    ChainOutcome,
    StepCallback,
    StepInvoker,
    ToolCallError,
    ToolInvoker,
    ToolResult,
)
from imageflow.server.domain.frames import Frame, ImageHeader, serialized
from imageflow.v1 import image_pb2, tool_pb2, tool_service_pb2, tool_service_pb2_grpc
from opentelemetry.propagate import inject


class ChannelPool:
    """Channels keyed by address; created on first use, closed together."""

    def __init__(self, max_message_bytes: int, credentials: grpc.ChannelCredentials | None = None) -> None:
        self._options = [
            *channel_options(max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            # a restarted tool is dialled again within a second (gRPC's default backoff grows to 120 s)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._credentials = credentials
        self._plaintext: set[str] = set()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def allow_plaintext(self, address: str) -> None:
        """Dial `address` without TLS even when the pool has credentials (the loopback tool services this process
        started itself)."""
        self._plaintext.add(address)

    def channel(self, address: str) -> grpc.aio.Channel:
        """The shared channel to `address` (TLS when the pool has credentials)."""
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is None or address in self._plaintext:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            else:
                channel = grpc.aio.secure_channel(address, self._credentials, options=self._options)
            self._channels[address] = channel
        return channel

    def __contains__(self, address: str) -> bool:
        return address in self._channels

    async def forget(self, address: str) -> None:
        """Close and drop the channel to `address`, if any."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close(None)

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)


RECONNECT_WAIT_S = 3.0
PROCESS_METHOD = "/imageflow.v1.ToolService/Process"
CHAIN_METHOD = "/imageflow.v1.ToolService/ProcessChain"
STREAM_METHOD = "/imageflow.v1.ToolService/ProcessChainStream"
BRANCHES_METHOD = "/imageflow.v1.ToolService/ProcessBranches"
GATHER_BYTES = 1024 * 1024
"""Calls that start together (in one turn of the event loop) on the same frame of at least this many bytes, to one
service that takes branches, travel as one ProcessBranches call: the frame crosses once. Below it, a frame's transfer
costs less than is worth the wait of a turn."""
STREAM_BYTES = 8 * 1024 * 1024
"""Frames larger than this go to a tool in pieces (ProcessChainStream) rather than in one message."""
ACCEPT_WAIT_S = 2.0
"""How long a ProcessChainStream caller waits for the service to accept the call (its initial metadata) before it
writes anyway (a service that keeps it waiting is not waited for again)."""
MAPPED_FROM_BYTES = 1024 * 1024
"""Answers at least this large are assembled in a memory map of their own (returned to the system when the frame
goes); smaller ones in the heap."""
NO_STREAM_RECHECK_S = 300.0
"""How long a service that answered UNIMPLEMENTED to ProcessChainStream is called the unary way before it is tried
again."""
_IMAGE_DATA = image_pb2.Image.DESCRIPTOR.fields_by_name["data"].number
_IMAGE_DATA_KEY = encode_varint(_IMAGE_DATA << 3 | LENGTH_DELIMITED)
_DATA_BYTES_KEY = encode_varint(2 << 3 | VARINT)  # ProcessChainStreamRequest.data_bytes
ResponseT = TypeVar("ResponseT", tool_service_pb2.ProcessResponse, tool_service_pb2.ProcessChainResponse)
CallT = TypeVar("CallT")
_CHAIN_IMAGE = tool_service_pb2.ProcessChainResponse.DESCRIPTOR.fields_by_name["image"].number
_BRANCH_FIELDS = tool_service_pb2.ProcessBranchesResponse.DESCRIPTOR.fields_by_name
_BRANCH_INDEX, _BRANCH_RESPONSE = _BRANCH_FIELDS["branch_index"].number, _BRANCH_FIELDS["response"].number


@dataclass
class _Branch:
    """One caller's call waiting to travel with its siblings in one ProcessBranches call."""

    method: str
    request: Message
    response_type: type[Any]
    timeout_s: float
    future: asyncio.Future[tuple[memoryview, tool_service_pb2.ProcessChainResponse] | None]
    """The answer, or None: make the call on your own (it is alone, or the service does not serve the method)."""

    def chain(self) -> tool_service_pb2.ProcessChainRequest:
        """The call as a branch: a chain without an image (a Process is a one-step chain)."""
        if isinstance(self.request, tool_service_pb2.ProcessChainRequest):
            return self.request
        request = cast(tool_service_pb2.ProcessRequest, self.request)
        return _as_chain([request], request.output_to_shared_memory)


@dataclass
class _Gathering:
    """The calls on one frame to one service that started in this turn of the event loop."""

    image: Frame
    branches: list[_Branch] = field(default_factory=list)


def _as_chain(
    requests: Sequence[tool_service_pb2.ProcessRequest], to_shared_memory: bool
) -> tool_service_pb2.ProcessChainRequest:
    """Steps as one chain without an image: its output as the last step asks."""
    last = requests[-1]
    return tool_service_pb2.ProcessChainRequest(
        steps=[tool_service_pb2.ChainStep(tool=r.tool, params=r.params, detections=r.detections) for r in requests],
        output_media_type=last.output_media_type,
        output_quality=last.output_quality,
        output_to_shared_memory=to_shared_memory,
        omit_output_image=last.omit_output_image,
    )


def _only_result(address: str, chain: tool_service_pb2.ProcessChainResponse) -> tool_service_pb2.ChainStepResult:
    """A one-step chain's result, or what its Process call would have raised (the step's failure as the status)."""
    if chain.HasField("failure"):
        raise ToolCallError(chain.failure.code or "INTERNAL", chain.failure.message, chain.failure.reason)
    if len(chain.results) != 1:
        raise ToolCallError("INTERNAL", f"the tool at {address} answered {len(chain.results)} results for 1 step")
    return chain.results[0]


def _branch_reply(address: str, reply: bytes) -> tuple[int, memoryview, tool_service_pb2.ProcessChainResponse]:
    """One ProcessBranches message: the branch's index, its output image (zero-copy) and the rest of its response."""
    try:
        index, inner = 0, memoryview(b"")
        for number, wire, start, end in fields(reply):
            if number == _BRANCH_INDEX and wire == VARINT:
                index = start
            elif number == _BRANCH_RESPONSE and wire == LENGTH_DELIMITED:
                inner = memoryview(reply)[start:end]
        output, rest = split_field(inner, _CHAIN_IMAGE)
        return index, output, tool_service_pb2.ProcessChainResponse.FromString(rest)
    except (ValueError, DecodeError):
        raise ToolCallError("INTERNAL", f"the tool at {address} sent a malformed ProcessBranchesResponse") from None


class SharedFrame:
    """A raw frame a tool service left in shared memory: the serialized Image (a handle, no pixels) that the next tool
    on this host reads directly. The object is unlinked (off the event loop) when the last reference to the frame
    goes."""

    def __init__(self, image: bytes, header: ImageHeader, name: str) -> None:
        self.header = header
        self.name = name
        self._image = image
        weakref.finalize(self, UNLINKER.unlink, name)

    def serialized(self) -> bytes:
        """The Image with its shared-memory handle."""
        return self._image

    def inline(self) -> bytes:
        """The Image with the pixels read back into `data`, for consumers off this path."""
        image = image_pb2.Image.FromString(self._image)
        region = image.shared_memory
        image.data = read_region(region.name, region.byte_size)
        image.ClearField("shared_memory")
        return image.SerializeToString()


def _frame_bytes(image: Frame) -> int:
    """About how many bytes a frame is once serialized: its length (a shared-memory frame: its handle's), or for a
    frame kept decoded in this process its pixels' (it is not serialized just to be measured)."""
    if isinstance(image, bytes | memoryview):
        return len(image)
    if isinstance(image, SharedFrame):
        return len(image.serialized())
    header = image.header
    return header.width * header.height * (1 if header.media_type == RAW_GRAY else 3)


def _shared(output: memoryview, header: ImageHeader) -> Frame:
    """A response image that points at shared memory becomes a SharedFrame; anything else stays bytes."""
    if header.media_type not in RAW_TYPES or len(output) > 4096:  # inline pixels are never this small a message
        return output
    image = image_pb2.Image.FromString(bytes(output))
    if not image.HasField("shared_memory"):
        return output
    return SharedFrame(bytes(output), header, image.shared_memory.name)


class GrpcToolInvoker:
    """Calls ToolService/Process over the pool, splicing the image bytes instead of copying them through messages.
    With `shared_memory` (control plane and tools on one host), raw frames between steps stay in /dev/shm. Frames
    over `stream_bytes` go in pieces (ProcessChainStream) to the addresses `streams` names."""

    def __init__(
        self,
        pool: ChannelPool,
        *,
        shared_memory: bool = False,
        stream_bytes: int = STREAM_BYTES,
        streams: Callable[[str], bool] = lambda address: False,
        branches: Callable[[str], bool] = lambda address: False,
        max_frame_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self._pool = pool
        self._shared_memory = shared_memory
        self._stream_bytes = stream_bytes
        self._takes_pieces = streams
        self._takes_branches = branches
        self._max_frame_bytes = max_frame_bytes
        self._callables: dict[tuple[str, str], tuple[grpc.aio.Channel, object]] = {}
        """Each method's callable by address and method path, with the channel it was made on."""
        self._accepts_late: set[str] = set()
        """Addresses whose ProcessChainStream did not accept the call (initial metadata) before reading: not waited
        for."""
        self._no_stream: dict[str, float] = {}
        """Addresses that answered UNIMPLEMENTED to ProcessChainStream (services that predate it), until when they are
        called the unary way (a service upgraded in place is tried again after that)."""
        self._gathering: dict[tuple[str, int], _Gathering] = {}
        """Calls waiting for the end of this turn of the event loop, by address and frame (the frame's identity: the
        same object, held here while it waits)."""
        self._no_branches: dict[str, float] = {}
        """Addresses that answered UNIMPLEMENTED to ProcessBranches, until when their calls travel one by one."""
        self._sending: set[asyncio.Task[None]] = set()
        """The ProcessBranches calls in flight (held here: the event loop keeps only weak references to tasks)."""

    def _multicallable(self, address: str, method: str, make: Callable[[grpc.aio.Channel], CallT]) -> CallT:
        """`make`'s callable for `method` on the pooled channel to `address`, kept while that channel lasts."""
        channel = self._pool.channel(address)
        cached = self._callables.get((address, method))
        if cached is None or cached[0] is not channel:  # the pool may have replaced a forgotten channel
            cached = self._callables[(address, method)] = (channel, make(channel))
        return cast(CallT, cached[1])

    def _call(self, address: str, method: str = PROCESS_METHOD) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        return self._multicallable(  # bytes in and out
            address, method, lambda c: c.unary_unary(method, request_serializer=None, response_deserializer=None)
        )

    def _stream(self, address: str) -> grpc.aio.StreamStreamMultiCallable[bytes, bytes]:
        return self._multicallable(
            address,
            STREAM_METHOD,
            lambda c: c.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=None),
        )

    def _branch_stream(self, address: str) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
        return self._multicallable(
            address,
            BRANCHES_METHOD,
            lambda c: c.unary_stream(BRANCHES_METHOD, request_serializer=None, response_deserializer=None),
        )

    def _gathers(self, address: str, image: Frame) -> bool:
        """Whether a unary call on this frame waits for siblings on the same frame (ProcessBranches): a frame worth
        it, inline, to a service that takes branches (and has not answered UNIMPLEMENTED lately all the same)."""
        if not isinstance(image, bytes | memoryview) or len(image) < GATHER_BYTES or not self._takes_branches(address):
            return False
        return self._no_branches.get(address, 0.0) <= time.monotonic()

    def _streams_frame(self, address: str, image: Frame) -> bool:
        """Whether a frame this large goes in pieces (ProcessChainStream) to `address`: over the threshold, to a
        service whose manifest says it takes them (and that has not answered UNIMPLEMENTED lately all the same)."""
        if self._stream_bytes <= 0 or not self._takes_pieces(address):
            return False
        if self._no_stream.get(address, 0.0) > time.monotonic():
            return False
        return _frame_bytes(image) > self._stream_bytes

    def _to_shared_memory(self, output_media_type: str) -> bool:
        """Whether a step's output goes through shared memory: raw frames between steps, when it is on."""
        return self._shared_memory and output_media_type in (RAW_ANY, RAW_GRAY)

    async def _reconnected(self, address: str, within_s: float) -> float:
        """A channel that lost its tool (restarting) gets up to `within_s` to reconnect before the call, so a retry
        outlasts a restart instead of failing fast against a channel still in TRANSIENT_FAILURE."""
        channel = self._pool.channel(address)
        if channel.get_state(try_to_connect=False) != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return 0.0
        began = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(channel.channel_ready(), within_s)
        return time.monotonic() - began

    async def process(
        self, address: str, request: tool_service_pb2.ProcessRequest, image: Frame, timeout_s: float
    ) -> ToolResult:
        """One call; failures become ToolCallError with the status code name."""
        if self._to_shared_memory(request.output_media_type):  # (a tool that omits the image makes no object)
            request.output_to_shared_memory = True
        if self._streams_frame(address, image):
            head = _as_chain([request], request.output_to_shared_memory)
            streamed = await self._exchange_pieces(address, head, image, timeout_s)
            if streamed is not None:
                output, chain = streamed
                only = _only_result(address, chain)
                header = image_header(output)
                return ToolResult(_shared(output, header), header, list(only.detections), only.metadata)
        output, small = await self._exchange(
            address, PROCESS_METHOD, request, image, tool_service_pb2.ProcessResponse, timeout_s
        )
        header = image_header(output)
        return ToolResult(_shared(output, header), header, list(small.detections), small.metadata)

    async def _exchange(
        self,
        address: str,
        method: str,
        request: Message,
        image: Frame,
        response_type: type[ResponseT],
        timeout_s: float,
    ) -> tuple[memoryview, ResponseT]:
        """One call with the image spliced in as the request's field `image` and sliced out of the response's (the
        frame is never copied through a message); failures become ToolCallError with the status code name. Calls
        on the same frame that start together travel as one ProcessBranches call where they can (`_gathers`)."""
        if self._gathers(address, image):
            return await self._gathered(address, method, request, image, response_type, timeout_s)
        return await self._unary(address, method, request, image, response_type, timeout_s)

    async def _unary(
        self,
        address: str,
        method: str,
        request: Message,
        image: Frame,
        response_type: type[ResponseT],
        timeout_s: float,
    ) -> tuple[memoryview, ResponseT]:
        """The call on its own (see `_exchange`)."""
        image_in: int = request.DESCRIPTOR.fields_by_name["image"].number
        body = b"".join([request.SerializeToString(), *length_delimited(image_in, serialized(image))])
        carrier: dict[str, str] = {}
        inject(carrier)  # W3C traceparent: tool spans join the step's trace
        timeout_s -= await self._reconnected(address, min(RECONNECT_WAIT_S, timeout_s / 2))
        try:
            reply = await self._call(address, method)(body, timeout=timeout_s, metadata=tuple(carrier.items()))
        except grpc.aio.AioRpcError as error:
            raise ToolCallError(error.code().name, error.details() or "", error_reason(error)) from None
        try:
            output, rest = split_field(reply, response_type.DESCRIPTOR.fields_by_name["image"].number)
            return output, response_type.FromString(rest)
        except (ValueError, DecodeError):
            raise ToolCallError(
                "INTERNAL", f"the tool at {address} sent a malformed {response_type.DESCRIPTOR.name}"
            ) from None

    async def _gathered(
        self,
        address: str,
        method: str,
        request: Message,
        image: Frame,
        response_type: type[ResponseT],
        timeout_s: float,
    ) -> tuple[memoryview, ResponseT]:
        """The call as a branch of the ProcessBranches call that the calls on this frame starting in this turn of the
        event loop make together; its answer as the call itself would have had it. Alone (or to a service that turns
        out not to serve the method) it is made on its own, in the caller's task, like any other call."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        key = (address, id(image))
        gathering = self._gathering.get(key)
        if gathering is None:
            gathering = self._gathering[key] = _Gathering(image)
            loop.call_soon(self._send_gathered, key)
        branch = _Branch(method, request, response_type, timeout_s, loop.create_future())
        gathering.branches.append(branch)
        try:
            async with asyncio.timeout_at(deadline):
                answer = await branch.future
        except TimeoutError:
            raise ToolCallError("DEADLINE_EXCEEDED", "Deadline Exceeded") from None  # gRPC's own words
        del gathering, branch  # (nothing here holds the frame or the answer longer than the caller)
        if answer is None:  # on its own after all
            return await self._unary(address, method, request, image, response_type, max(0.001, deadline - loop.time()))
        output, chain = answer
        if response_type is tool_service_pb2.ProcessChainResponse:
            return output, cast(Any, chain)
        only = _only_result(address, chain)
        return output, cast(Any, tool_service_pb2.ProcessResponse(detections=only.detections, metadata=only.metadata))

    def _send_gathered(self, key: tuple[str, int]) -> None:
        """At the end of the turn: several calls on the frame go together; a lone one goes back to its caller."""
        gathering = self._gathering.pop(key)
        branches = [branch for branch in gathering.branches if not branch.future.done()]
        if len(branches) < 2:
            for branch in branches:
                branch.future.set_result(None)
            return
        task = asyncio.get_running_loop().create_task(self._send_branches(key[0], gathering.image, branches))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send_branches(self, address: str, image: Frame, branches: list[_Branch]) -> None:
        """One ProcessBranches call for `branches`; each caller gets its answer as its branch ends (and the answer is
        let go here). A service that answers UNIMPLEMENTED before any branch sends every call back to its caller."""
        waiting = dict(enumerate(branches))
        total = len(waiting)
        body = b"".join(
            [
                *length_delimited(1, serialized(image)),
                *(p for b in branches for p in length_delimited(2, b.chain().SerializeToString())),
            ]
        )
        timeout_s = max(branch.timeout_s for branch in branches)
        del image, branches
        carrier: dict[str, str] = {}
        inject(carrier)  # the first caller's trace (the turn's callback runs in its context)
        failure: ToolCallError | None = None
        call: grpc.aio.UnaryStreamCall[bytes, bytes] | None = None

        def abandoned(_: object) -> None:  # every caller still waiting is gone (cancelled, past its timeout): end it
            if call is not None and waiting and all(b.future.done() for b in waiting.values()) and not call.done():
                call.cancel()

        for branch in waiting.values():
            branch.future.add_done_callback(abandoned)
        try:
            timeout_s -= await self._reconnected(address, min(RECONNECT_WAIT_S, timeout_s / 2))
            call = self._branch_stream(address)(body, timeout=timeout_s, metadata=tuple(carrier.items()))
            del body
            async for reply in call:
                index, output, chain = _branch_reply(address, reply)
                answered = waiting.pop(index, None)
                if answered is None:
                    raise ToolCallError(
                        "INTERNAL", f"the tool at {address} answered branch {index} twice or out of range"
                    )
                if answered.future.done():  # its caller is gone: a frame it left in shared memory goes now
                    with contextlib.suppress(ValueError, DecodeError):
                        _shared(output, image_header(output))
                else:
                    answered.future.set_result((output, chain))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED and len(waiting) == total:
                self._no_branches[address] = time.monotonic() + NO_STREAM_RECHECK_S
                for branch in waiting.values():
                    if not branch.future.done():
                        branch.future.set_result(None)  # each caller makes its own call
                return
            failure = ToolCallError(error.code().name, error.details() or "", error_reason(error))
        except ToolCallError as malformed:
            failure = malformed
        except asyncio.CancelledError:
            if call is None or not call.cancelled():  # this task was cancelled (shutdown), not the call by `abandoned`
                failure = ToolCallError("CANCELLED", f"the call to {address} was cancelled")
                self._fail(waiting, failure)
                raise
        except Exception as error:  # noqa: BLE001 - a bug: the callers fail with it, not at their timeouts
            self._fail(waiting, error)
            return
        finally:
            if call is not None and not call.done():
                call.cancel()
        self._fail(
            waiting,
            failure
            or ToolCallError("INTERNAL", f"the tool at {address} ended ProcessBranches before answering every branch"),
        )

    @staticmethod
    def _fail(waiting: dict[int, _Branch], failure: Exception) -> None:
        """The callers still waiting get `failure` as their call's."""
        for branch in waiting.values():
            if not branch.future.done():
                branch.future.set_exception(failure)

    async def _exchange_pieces(
        self, address: str, chain: tool_service_pb2.ProcessChainRequest, image: Frame, timeout_s: float
    ) -> tuple[memoryview, tool_service_pb2.ProcessChainResponse] | None:
        """A ProcessChainStream call: the frame goes in pieces and the output comes back in pieces into one buffer
        laid out as a serialized Image, so neither is ever whole in a gRPC message. None when the service does not
        implement the method (it is then called the unary way for a while).

        Nothing is written before the service has accepted the call (its initial metadata; the contract asks services
        to send it first, and a caller waits ACCEPT_WAIT_S at most): a grpc.aio caller still
        writing when the call ends gets INTERNAL in place of the service's status (grpc/grpc#36066), which would hide
        an UNIMPLEMENTED from a service that predates the method."""
        frame = serialized(image)
        data, rest = split_field(frame, _IMAGE_DATA)
        head = tool_service_pb2.ProcessChainRequest()
        head.CopyFrom(chain)
        head.image.MergeFromString(bytes(rest))  # the image's other fields (media type, size)
        first = b"".join([*length_delimited(1, head.SerializeToString()), _DATA_BYTES_KEY, encode_varint(len(data))])
        carrier: dict[str, str] = {}
        inject(carrier)
        timeout_s -= await self._reconnected(address, min(RECONNECT_WAIT_S, timeout_s / 2))
        call = self._stream(address)(None, timeout=timeout_s, metadata=tuple(carrier.items()))
        response: tool_service_pb2.ProcessChainResponse | None = None
        assembly: Assembly | None = None
        try:
            if address not in self._accepts_late:
                try:
                    await asyncio.wait_for(asyncio.shield(call.initial_metadata()), ACCEPT_WAIT_S)
                except (
                    TimeoutError
                ):  # a service that does not accept first: it gets the pieces anyway, unwaited next time
                    self._accepts_late.add(address)
            if not call.done():
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):  # the status says why
                    await call.write(first)
                    for piece in pieces(data):
                        await call.write(b"".join(length_delimited(3, piece)))
                    await call.done_writing()
            async for reply in call:
                response, assembly = self._take_piece(address, reply, response, assembly)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._no_stream[address] = time.monotonic() + NO_STREAM_RECHECK_S
                return None
            raise ToolCallError(error.code().name, error.details() or "", error_reason(error)) from None
        except OSError as error:  # no memory map for the answer
            raise ToolCallError("RESOURCE_EXHAUSTED", f"cannot hold the answer of {address}: {error}") from None
        finally:
            if not call.done():  # cancelled, or gave up on a malformed answer: end the call, not just our side of it
                call.cancel()
        if response is None or assembly is None:
            raise ToolCallError("INTERNAL", f"the tool at {address} ended ProcessChainStream without a head")
        try:
            output = assembly.result()
        except PieceError as error:
            raise ToolCallError("INTERNAL", f"the tool at {address} sent a short image: {error}") from None
        return output, response

    def _take_piece(
        self,
        address: str,
        reply: bytes,
        response: tool_service_pb2.ProcessChainResponse | None,
        assembly: Assembly | None,
    ) -> tuple[tool_service_pb2.ProcessChainResponse, Assembly]:
        """One message of a ProcessChainStream reply: the head (the response, and the output's buffer allocated once
        with the Image's other fields before its data), or the next piece copied into place."""
        try:
            parts = fields(reply)
            if response is None or assembly is None:
                head = next((reply[start:end] for number, _, start, end in parts if number == 1), None)
                declared = next((start for number, wire, start, _ in parts if number == 2 and wire == VARINT), 0)
                if head is None:
                    raise ValueError("the first message has no head")
                if declared > self._max_frame_bytes:
                    raise ValueError(f"data_bytes {declared} is over the limit of {self._max_frame_bytes}")
                response = tool_service_pb2.ProcessChainResponse.FromString(head)
                image = response.image.SerializeToString() if response.HasField("image") else b""
                response.ClearField("image")
                prefix = b"".join([image, _IMAGE_DATA_KEY, encode_varint(declared)])
                mapped = declared >= MAPPED_FROM_BYTES
                return response, Assembly(declared, prefix if image or declared else b"", mapped=mapped)
            for number, wire, start, end in parts:
                if number == 3 and wire == LENGTH_DELIMITED:
                    assembly.add(memoryview(reply)[start:end])
            return response, assembly
        except (ValueError, DecodeError) as error:
            raise ToolCallError(
                "INTERNAL", f"the tool at {address} sent a malformed ProcessChainStream reply: {error}"
            ) from None

    def keeps_frames(self, address: str) -> bool:
        """Frames to a tool service travel over the network."""
        return False

    async def process_chain(
        self,
        address: str,
        requests: Sequence[tool_service_pb2.ProcessRequest],
        image: Frame,
        timeout_s: float,
        on_step: StepCallback,
        addresses: Sequence[str] | None = None,
    ) -> ChainOutcome:
        """One ProcessChain call; the image is spliced in and out like Process. Every step must be at `address`."""
        if addresses is not None and any(other != address for other in addresses):
            raise ToolCallError("INTERNAL", f"a chain across services cannot travel in one call to {address}")
        head = _as_chain(requests, self._to_shared_memory(requests[-1].output_media_type))
        streamed = (
            await self._exchange_pieces(address, head, image, timeout_s)
            if self._streams_frame(address, image)
            else None
        )
        if streamed is None:
            streamed = await self._exchange(
                address, CHAIN_METHOD, head, image, tool_service_pb2.ProcessChainResponse, timeout_s
            )
        output, small = streamed
        done = len(small.results)
        failed = small.HasField("failure")
        inconsistent = done >= len(requests) or small.failure.step_index != done if failed else done != len(requests)
        if inconsistent:
            raise ToolCallError("INTERNAL", f"the tool at {address} answered {done} results for {len(requests)} steps")
        for index, result in enumerate(small.results):
            header = ImageHeader(result.media_type, result.width, result.height)
            final = index == len(requests) - 1
            frame = _shared(output, header) if final else b""
            on_step(
                index,
                ToolResult(frame, header, list(result.detections), result.metadata),
                result.duration.ToNanoseconds() / 1e9,
            )
        if not failed:
            return ChainOutcome(done)
        failure = ToolCallError(small.failure.code or "INTERNAL", small.failure.message, small.failure.reason)
        return ChainOutcome(done, failure, output if done and len(output) else None)


class GrpcToolDescriber:
    """Calls ToolService/Describe for the registry."""

    def __init__(self, pool: ChannelPool, timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def describe(self, address: str) -> list[tool_pb2.Tool]:
        """The manifests served at `address`."""
        stub = tool_service_pb2_grpc.ToolServiceStub(self._pool.channel(address))
        try:
            response = await stub.Describe(
                tool_service_pb2.DescribeRequest(), timeout=self._timeout_s, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as error:
            raise unavailable(
                "TOOL_UNREACHABLE", f"cannot describe the tool service at {address}: {error.code().name}"
            ) from None
        return list(response.tools)

    async def forget(self, address: str) -> None:
        """Drop the pooled channel to `address`."""
        await self._pool.forget(address)


class RoutingInvoker:
    """Sends a step to the tools hosted in this process, to Triton when the registry says the tool is a Triton model,
    or to its tool service; chains go to the process or the service (Triton models are never chained)."""

    def __init__(
        self,
        services: ToolInvoker,
        triton: StepInvoker,
        is_triton_model: Callable[[str], bool],
        local: ToolInvoker | None = None,
    ) -> None:
        self._services = services
        self._triton = triton
        self._is_triton_model = is_triton_model
        self._local = local

    def _target(self, address: str, tool: str) -> StepInvoker:
        if self._local is not None and self._local.keeps_frames(address):
            return self._local
        return self._triton if self._is_triton_model(tool) else self._services

    async def process(
        self, address: str, request: tool_service_pb2.ProcessRequest, image: Frame, timeout_s: float
    ) -> ToolResult:
        """Dispatch by where the tool runs."""
        return await self._target(address, request.tool).process(address, request, image, timeout_s)

    def keeps_frames(self, address: str) -> bool:
        """True for the tools hosted in this process."""
        return self._local is not None and self._local.keeps_frames(address)

    async def process_chain(
        self,
        address: str,
        requests: Sequence[tool_service_pb2.ProcessRequest],
        image: Frame,
        timeout_s: float,
        on_step: StepCallback,
        addresses: Sequence[str] | None = None,
    ) -> ChainOutcome:
        """Dispatch a chain to the process or to the tool service."""
        target = self._local if self._local is not None and self._local.keeps_frames(address) else self._services
        return await target.process_chain(address, requests, image, timeout_s, on_step, addresses)
