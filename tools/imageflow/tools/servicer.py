"""ToolService over gRPC: translates requests to the service's ToolPlane and back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from imageflow.common.errors import ImageflowError, invalid_argument, resource_exhausted
from imageflow.common.grpc_errors import INTERNAL_MESSAGE
from imageflow.common.media import RAW_ANY, RAW_TYPES
from imageflow.common.pieces import Assembly, Buffer, PieceError, drain, pieces
from imageflow.common.shm import map_region, write_region
from imageflow.common.structs import dict_to_struct, struct_to_dict
from imageflow.common.wire import LENGTH_DELIMITED, encode_varint, split_field, split_repeated
from imageflow.tools.imaging import encode
from imageflow.tools.plane import ChainStepSpec, ToolPlane
from imageflow.tools.runner import ProcessResult
from imageflow.tools.spec import Box, Detection, PortSpec, ToolSpec
from imageflow.v1 import image_pb2, tool_pb2, tool_service_pb2, tool_service_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = tool_service_pb2.DESCRIPTOR.services_by_name["ToolService"].full_name
_DATA = image_pb2.Image.DESCRIPTOR.fields_by_name["data"].number
RequestT = TypeVar(
    "RequestT",
    tool_service_pb2.ProcessRequest,
    tool_service_pb2.ProcessChainRequest,
    tool_service_pb2.ProcessBranchesRequest,
)
ResponseT = TypeVar("ResponseT", tool_service_pb2.ProcessResponse, tool_service_pb2.ProcessChainResponse)


def port_message(port: PortSpec) -> tool_pb2.Port:
    """A PortSpec as its protobuf message."""
    return tool_pb2.Port(name=port.name, type=tool_pb2.PortType.Value(port.type), required=port.required)


def tool_message(spec: ToolSpec) -> tool_pb2.Tool:
    """A ToolSpec as the manifest Describe publishes."""
    return tool_pb2.Tool(
        name=spec.name,
        version=spec.version,
        description_ja=spec.description_ja,
        description_en=spec.description_en,
        params_schema=dict_to_struct(spec.params_schema),
        inputs=[port_message(p) for p in spec.inputs],
        outputs=[port_message(p) for p in spec.outputs],
        kind=tool_pb2.TOOL_KIND_SERVICE,
        enabled=True,
        chainable=True,
        phrases_ja=list(spec.phrases_ja),
        reads_luma=spec.reads_luma,
        keeps_luma=spec.keeps_luma,
        streams_frames=True,
        takes_branches=True,
    )


def detection_from_message(message: image_pb2.Detection) -> Detection:
    """Protobuf detection to the domain type."""
    box = message.box
    return Detection(message.label, message.score, Box(box.x, box.y, box.width, box.height))


def detection_message(det: Detection) -> image_pb2.Detection:
    """Domain detection to protobuf."""
    return image_pb2.Detection(
        label=det.label,
        score=det.score,
        box=image_pb2.BoundingBox(x=det.box.x, y=det.box.y, width=det.box.width, height=det.box.height),
    )


def image_bytes(image: image_pb2.Image) -> Buffer:
    """The image's pixels or file: inline, or mapped from the caller's shared memory."""
    if image.HasField("shared_memory"):
        return map_region(image.shared_memory.name, image.shared_memory.byte_size)
    return image.data


def fill_output_image(image: image_pb2.Image, result: ProcessResult, shared: bool) -> bytes:
    """Fill the response's image in place (a message passed to a constructor is copied, its pixels with it: 2 ms
    for a raw 1080p frame here) but its `data`: raw pixels go into a new shared-memory object when the caller asked
    (returns b""), else the bytes for `data` are returned."""
    image.SetInParent()  # present even when every field is empty (an omitted image keeps its type and size)
    image.media_type, image.width, image.height = result.media_type, result.width, result.height
    if shared and result.media_type in RAW_TYPES:
        name, size = write_region(raw_buffer(result))
        image.shared_memory.name, image.shared_memory.byte_size = name, size
        return b""
    return result.data


def raw_buffer(result: ProcessResult) -> bytes | memoryview:
    """A raw result's bytes: its pixels as they lie when it kept them (asked for shared memory: written there
    straight from the frame, not first copied into bytes), else its data."""
    if result.pixels is None:
        return result.data
    if result.pixels.size == 0:  # (a view with a zero in its shape cannot be cast)
        return b""
    return np.ascontiguousarray(result.pixels).data.cast("B")


@dataclass(frozen=True)
class Received(Generic[RequestT]):
    """A request as `add_to_server` parses it: the message without its image's `data`, and that data as a view of
    the bytes gRPC received (a raw 1080p frame is not copied into a message and out again)."""

    request: RequestT
    data: Buffer

    def source(self) -> Buffer:
        """The image's pixels or file: these, or mapped from the caller's shared memory."""
        if self.request.image.HasField("shared_memory"):
            return image_bytes(self.request.image)
        return self.data


@dataclass(frozen=True)
class Spliced(Generic[ResponseT]):
    """A response without its image's `data`, and that data: serialized with the data spliced in as the image's."""

    response: ResponseT
    data: Buffer


def receiver(message_type: type[RequestT]) -> Callable[[bytes], Received[RequestT]]:
    """The request deserializer of a method whose image comes spliced: ValueError (bad input) on malformed bytes."""
    image_field = message_type.DESCRIPTOR.fields_by_name["image"].number

    def parse(raw: bytes) -> Received[RequestT]:
        try:
            images, rest = split_repeated(raw, image_field)
            data, head = split_field(images[0], _DATA) if len(images) == 1 else (b"", b"")
        except ValueError:  # wire data this reader does not take apart (groups, say): protobuf decides
            images = []
        if len(images) != 1:  # none, or a sender that split the image (protobuf merges the parts): parse it whole
            whole = message_type.FromString(raw)
            return Received(whole, whole.image.data)
        request = message_type.FromString(rest)
        request.image.SetInParent()
        request.image.MergeFromString(head)
        return Received(request, data)  # (`data` given twice: the last one counts, as protobuf merges)

    return parse


@dataclass(frozen=True)
class BranchDone:
    """One branch of a ProcessBranches call as it ends: its index and its chain's response, spliced."""

    index: int
    chain: Spliced[tool_service_pb2.ProcessChainResponse]


def sender(message_type: type[ResponseT]) -> Callable[[Spliced[ResponseT]], bytes]:
    """The response serializer of a method whose image goes spliced: the message, then its image with the data."""
    parts = spliced_parts(message_type)

    def serialize(out: Spliced[ResponseT]) -> bytes:
        return b"".join(parts(out))

    return serialize


def branch_sender() -> Callable[[BranchDone], bytes]:
    """The response serializer of ProcessBranches: the branch's index, then its chain's response with the image's
    data spliced in (joined once)."""
    parts = spliced_parts(tool_service_pb2.ProcessChainResponse)
    fields = tool_service_pb2.ProcessBranchesResponse.DESCRIPTOR.fields_by_name
    index_key = encode_varint(fields["branch_index"].number << 3)  # a varint
    response_key = encode_varint(fields["response"].number << 3 | LENGTH_DELIMITED)

    def serialize(done: BranchDone) -> bytes:
        chain = parts(done.chain)
        size = sum(len(part) for part in chain)
        return b"".join([index_key, encode_varint(done.index), response_key, encode_varint(size), *chain])

    return serialize


def spliced_parts(message_type: type[ResponseT]) -> Callable[[Spliced[ResponseT]], list[Buffer]]:
    """The pieces of a spliced response's serialization, in order (join them, or wrap them in an outer field)."""
    image_key = encode_varint(message_type.DESCRIPTOR.fields_by_name["image"].number << 3 | LENGTH_DELIMITED)
    data_key = encode_varint(_DATA << 3 | LENGTH_DELIMITED)

    def serialize(out: Spliced[ResponseT]) -> list[Buffer]:
        if not out.data:
            return [out.response.SerializeToString()]
        head = out.response.image.SerializeToString()
        out.response.ClearField("image")
        try:
            rest = out.response.SerializeToString()
        finally:  # the response is left as it was
            out.response.image.SetInParent()
            out.response.image.MergeFromString(head)
        length = encode_varint(len(out.data))
        image_length = encode_varint(len(head) + len(data_key) + len(length) + len(out.data))
        return [rest, image_key, image_length, head, data_key, length, out.data]

    return serialize


def _output_to_shared_memory(request: tool_service_pb2.ProcessRequest | tool_service_pb2.ProcessChainRequest) -> bool:
    """Whether the caller asked for the output in shared memory and reads it."""
    return request.output_to_shared_memory and not request.omit_output_image


def _inline(response: ResponseT, data: bytes) -> ResponseT:
    """A response with its image's data put in (for a service registered the generated way)."""
    if data:
        response.image.data = data
    return response


def _assembly(declared: int) -> Assembly:
    try:
        return Assembly(declared)
    except PieceError as error:
        raise invalid_argument("STREAM_BAD_LENGTH", f"data_bytes: {error}") from None


def _add(assembly: Assembly, piece: bytes) -> None:
    try:
        assembly.add(piece)
    except PieceError as error:
        raise invalid_argument("STREAM_LENGTH_MISMATCH", f"image data: {error}") from None


def _complete(assembly: Assembly) -> memoryview:
    try:
        return assembly.result()
    except PieceError as error:
        raise invalid_argument("STREAM_LENGTH_MISMATCH", f"image data: {error}") from None


class ToolServicer(tool_service_pb2_grpc.ToolServiceServicer):
    """ToolService over gRPC: translates requests to the service's ToolPlane and back."""

    def __init__(self, plane: ToolPlane, max_data_bytes: int = 512 * 1024 * 1024) -> None:
        self.plane = plane
        self.max_data_bytes = max_data_bytes
        """The most image bytes ProcessChainStream accepts (what a unary message may carry)."""

    async def Describe(
        self, request: tool_service_pb2.DescribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tool_service_pb2.DescribeResponse:
        """Publish the manifests."""
        return tool_service_pb2.DescribeResponse(
            service=self.plane.service, tools=[tool_message(spec) for spec in self.plane.tools.values()]
        )

    async def Process(
        self, request: tool_service_pb2.ProcessRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tool_service_pb2.ProcessResponse:
        """Run one tool on one image."""
        return _inline(*await self._process(request, image_bytes(request.image)))

    async def process_spliced(
        self, received: Received[tool_service_pb2.ProcessRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Spliced[tool_service_pb2.ProcessResponse]:
        """Process as `add_to_server` registers it: the image's bytes neither copied out of the request nor into the
        response."""
        return Spliced(*await self._process(received.request, received.source()))

    async def _process(
        self, request: tool_service_pb2.ProcessRequest, data: Buffer
    ) -> tuple[tool_service_pb2.ProcessResponse, bytes]:
        """Run the tool: the response with its image's fields but `data`, and that data apart."""
        shared = _output_to_shared_memory(request)
        result = await self.plane.run(
            request.tool,
            struct_to_dict(request.params),
            data=data,
            media_type=request.image.media_type,
            width=request.image.width,
            height=request.image.height,
            detections=[detection_from_message(d) for d in request.detections],
            output_media_type=request.output_media_type,
            output_quality=request.output_quality,
            keep_pixels=shared,  # a raw frame stays an array until it is written to shared memory
            omit_output=request.omit_output_image,
        )
        response = tool_service_pb2.ProcessResponse(
            detections=[detection_message(d) for d in result.detections], metadata=dict_to_struct(result.metadata)
        )
        return response, fill_output_image(response.image, result, shared)

    async def ProcessChain(
        self, request: tool_service_pb2.ProcessChainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tool_service_pb2.ProcessChainResponse:
        """Run consecutive steps on one image; a failing step is reported in the response."""
        return _inline(*await self._chain(request, image_bytes(request.image)))

    async def process_chain_spliced(
        self, received: Received[tool_service_pb2.ProcessChainRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Spliced[tool_service_pb2.ProcessChainResponse]:
        """ProcessChain as `add_to_server` registers it (see `process_spliced`)."""
        return Spliced(*await self._chain(received.request, received.source()))

    async def ProcessChainStream(
        self,
        request_iterator: AsyncIterator[tool_service_pb2.ProcessChainStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[tool_service_pb2.ProcessChainStreamResponse]:
        """ProcessChain with the image in pieces both ways. The call is accepted (initial metadata) before anything
        is read, so a caller that waits for that before it writes sees a refusal as the status it is."""
        await context.send_initial_metadata(())
        try:
            head, assembly = await self._receive(request_iterator)
        except ImageflowError:
            await drain(request_iterator)  # the caller may still be writing: let it finish, then it reads this status
            raise
        data = assembly.result() if assembly.declared else image_bytes(head.image)  # none: shared memory or empty
        response, out = await self._chain(head, data)
        yield tool_service_pb2.ProcessChainStreamResponse(head=response, data_bytes=len(out))
        for piece in pieces(out):
            yield tool_service_pb2.ProcessChainStreamResponse(data=bytes(piece))

    async def ProcessBranches(
        self, request: tool_service_pb2.ProcessBranchesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[tool_service_pb2.ProcessBranchesResponse]:
        """Run several chains on one image, each answered as it ends."""
        async for done in self._branches(request, image_bytes(request.image)):
            response = _inline(done.chain.response, bytes(done.chain.data))
            yield tool_service_pb2.ProcessBranchesResponse(branch_index=done.index, response=response)

    async def process_branches_spliced(
        self, received: Received[tool_service_pb2.ProcessBranchesRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[BranchDone]:
        """ProcessBranches as `add_to_server` registers it: the image's bytes are not copied out of the request, nor
        each branch's output into its response (see `process_spliced`)."""
        async for done in self._branches(received.request, received.source()):
            yield done

    async def _branches(
        self, request: tool_service_pb2.ProcessBranchesRequest, data: Buffer
    ) -> AsyncIterator[BranchDone]:
        """Every branch on the same image beside the others, each as it ends. A branch's refusal (a tool this service
        does not serve, params failing the schema, a bad image) is its failure, as data; the others run on."""
        if not request.branches:
            raise invalid_argument("BRANCHES_EMPTY", "ProcessBranches needs at least one branch")
        for index, branch in enumerate(request.branches):
            if branch.HasField("image"):
                raise invalid_argument(
                    "BRANCH_IMAGE", f"branches[{index}] has an image of its own; every branch runs on the request's"
                )
        image = request.image

        async def run(index: int, branch: tool_service_pb2.ProcessChainRequest) -> BranchDone:
            # the branch as a chain on the request's image: its fields but `data`, which stays where it is
            branch.image.SetInParent()
            branch.image.media_type, branch.image.width, branch.image.height = (
                image.media_type,
                image.width,
                image.height,
            )
            if image.HasField("shared_memory"):
                branch.image.shared_memory.CopyFrom(image.shared_memory)
            try:
                return BranchDone(index, Spliced(*await self._chain(branch, data)))
            except ImageflowError as error:
                failure = tool_service_pb2.ChainFailure(
                    step_index=0, code=error.kind.value, message=error.message, reason=error.reason
                )
            except Exception:  # a bug in one branch fails that branch, as its own call would fail, not its siblings
                log.exception("branch %d of a ProcessBranches call crashed", index)
                failure = tool_service_pb2.ChainFailure(step_index=0, code="INTERNAL", message=INTERNAL_MESSAGE)
            return BranchDone(index, Spliced(tool_service_pb2.ProcessChainResponse(failure=failure), b""))

        tasks = [asyncio.ensure_future(run(index, branch)) for index, branch in enumerate(request.branches)]
        try:
            for finished in asyncio.as_completed(tasks):
                yield await finished
        finally:  # the caller went away: the branches still running stop after the step they are in
            for task in tasks:
                task.cancel()

    async def _receive(
        self, messages: AsyncIterator[tool_service_pb2.ProcessChainStreamRequest]
    ) -> tuple[tool_service_pb2.ProcessChainRequest, Assembly]:
        """The head and the image's pieces, copied into one buffer of the declared length."""
        head: tool_service_pb2.ProcessChainRequest | None = None
        assembly = Assembly(0)
        async for message in messages:
            if head is None:
                if not message.HasField("head"):
                    raise invalid_argument("STREAM_HEAD_MISSING", "the first message must carry `head`")
                head = message.head
                if head.image.data:
                    raise invalid_argument(
                        "STREAM_INLINE_DATA", "head.image.data must be empty: the image's data follows in pieces"
                    )
                if message.data_bytes > self.max_data_bytes:
                    raise resource_exhausted(
                        "IMAGE_TOO_LARGE",
                        f"data_bytes {message.data_bytes} is over the limit of {self.max_data_bytes} bytes",
                    )
                assembly = _assembly(message.data_bytes)
            elif message.HasField("head"):
                raise invalid_argument("STREAM_HEAD_REPEATED", "only the first message may carry `head`")
            else:
                _add(assembly, message.data)
        if head is None:
            raise invalid_argument("STREAM_HEAD_MISSING", "the stream ended before `head`")
        if assembly.declared:
            _complete(assembly)
        return head, assembly

    async def _chain(
        self, request: tool_service_pb2.ProcessChainRequest, data: Buffer
    ) -> tuple[tool_service_pb2.ProcessChainResponse, bytes]:
        """Run the chain: the response with its image's fields but `data`, and that data apart (empty when there is
        no image or it went to shared memory)."""
        shared = _output_to_shared_memory(request)
        chain = await self.plane.run_chain(
            [
                ChainStepSpec(
                    step.tool, struct_to_dict(step.params), [detection_from_message(d) for d in step.detections]
                )
                for step in request.steps
            ],
            data=data,
            media_type=request.image.media_type,
            width=request.image.width,
            height=request.image.height,
            output_media_type=request.output_media_type,
            output_quality=request.output_quality,
            keep_pixels=shared,  # a raw frame stays an array until it is written to shared memory
            omit_output=request.omit_output_image,
        )
        response = tool_service_pb2.ProcessChainResponse()
        for done in chain.done:
            result = done.result
            step = response.results.add(
                width=result.width,
                height=result.height,
                media_type=result.media_type,
                detections=[detection_message(d) for d in result.detections],
                metadata=dict_to_struct(result.metadata),
            )
            step.duration.FromNanoseconds(int(done.seconds * 1e9))
        if chain.failure is None:
            return response, fill_output_image(response.image, chain.done[-1].result, shared)
        index, error = chain.failure
        response.failure.CopyFrom(
            tool_service_pb2.ChainFailure(
                step_index=index, code=error.kind.value, message=error.message, reason=error.reason
            )
        )
        if chain.done and chain.last_image is not None:
            pixels = chain.last_image.pixels
            out, media_type = encode(pixels, RAW_ANY)
            response.image.CopyFrom(
                image_pb2.Image(media_type=media_type, width=pixels.shape[1], height=pixels.shape[0])
            )
            return response, out
        return response, b""

    def close(self) -> None:
        """Stop the worker threads."""
        self.plane.close()


def add_to_server(servicer: ToolServicer, server: grpc.aio.Server) -> None:
    """Register `servicer` as the generated `add_ToolServiceServicer_to_server` does, except that `Process` and
    `ProcessChain` (and `ProcessBranches`) take their image's bytes where gRPC put them and send their output's bytes spliced around the
    response (`Received`, `Spliced`): a raw 1080p frame in and out of a call was four copies in messages (a parse,
    reading `data`, setting it, serializing), now one. The wire format is the same."""
    pb = tool_service_pb2
    handlers = {
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe,
            request_deserializer=pb.DescribeRequest.FromString,
            response_serializer=pb.DescribeResponse.SerializeToString,
        ),
        "Process": grpc.unary_unary_rpc_method_handler(
            servicer.process_spliced,
            request_deserializer=receiver(pb.ProcessRequest),
            response_serializer=sender(pb.ProcessResponse),
        ),
        "ProcessChain": grpc.unary_unary_rpc_method_handler(
            servicer.process_chain_spliced,
            request_deserializer=receiver(pb.ProcessChainRequest),
            response_serializer=sender(pb.ProcessChainResponse),
        ),
        "ProcessChainStream": grpc.stream_stream_rpc_method_handler(
            servicer.ProcessChainStream,
            request_deserializer=pb.ProcessChainStreamRequest.FromString,
            response_serializer=pb.ProcessChainStreamResponse.SerializeToString,
        ),
        "ProcessBranches": grpc.unary_stream_rpc_method_handler(
            servicer.process_branches_spliced,
            request_deserializer=receiver(pb.ProcessBranchesRequest),
            response_serializer=branch_sender(),
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]  # (as generated code)
