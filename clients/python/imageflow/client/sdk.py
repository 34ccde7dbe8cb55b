"""A typed client (sync and async, the same calls) for imageflow.v1; gRPC errors become ImageflowClientError with
the status code name, the server's message and its field violations.

Like httpx takes a transport, both clients take a ready `channel` (any credentials, interceptors or options) or build
one from `target` and optional TLS `credentials`; `token` is sent as `authorization: Bearer`."""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from imageflow.common.grpc_errors import error_from_rpc
from imageflow.common.pieces import pieces
from imageflow.common.tls import channel_credentials
from imageflow.v1 import (
    execution_pb2,
    image_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_pb2,
    tool_registry_service_pb2,
    tool_registry_service_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE = 512 * 1024 * 1024
UPLOAD_BYTES = 8 * 1024 * 1024
"""Inputs larger than this together go by ExecutePipelineUpload, in pieces: the server then holds them once."""
ACCEPT_WAIT_S = 2.0
"""How long a client waits for the server to accept an upload (its initial metadata, which says whether it answers a
go-ahead) before it writes anyway."""
LATE_RECHECK_S = 300.0
"""How long a client that was kept waiting by a server writes to it without waiting."""
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]


class ImageflowClientError(Exception):
    """A failed call: the status code name, the server's message and any field violations."""

    def __init__(self, code: str, message: str, violations: list[tuple[str, str]]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.violations = violations

    @classmethod
    def of(cls, error: grpc.RpcError) -> ImageflowClientError:
        """Translate an RpcError."""
        return cls(*error_from_rpc(error))


def image_from_file(path: Path | str) -> image_pb2.Image:
    """Read an image file as protobuf bytes (the server sniffs the format)."""
    path = Path(path)
    media_type = mimetypes.guess_type(path.name)[0] or ""
    return image_pb2.Image(data=path.read_bytes(), media_type=media_type if media_type.startswith("image/") else "")


def tls_credentials(
    ca_file: Path | str | None = None, cert_file: Path | str | None = None, key_file: Path | str | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials: the CA that signed the server's certificate (None = system roots), and for mTLS a client
    certificate and its key."""
    return channel_credentials(ca_file, cert_file, key_file)


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


class _Requests:
    """Request messages, built the same way for both clients."""

    @staticmethod
    def generate(
        instruction: str, base_pipeline_id: str, base_pipeline_version: int, base_pipeline: pipeline_pb2.Pipeline | None
    ) -> pipeline_service_pb2.GeneratePipelineRequest:
        request = pipeline_service_pb2.GeneratePipelineRequest(instruction=instruction)
        if base_pipeline_id:
            request.base_pipeline_id = base_pipeline_id
            request.base_pipeline_version = base_pipeline_version
        elif base_pipeline is not None:
            request.base_pipeline.CopyFrom(base_pipeline)
        return request

    @staticmethod
    def execute(
        pipeline: pipeline_pb2.Pipeline | str,
        inputs: dict[str, image_pb2.Image],
        version: int,
        request_id: str,
        omit_step_events: bool,
        cancel_on_disconnect: bool,
    ) -> pipeline_service_pb2.ExecutePipelineRequest:
        request = pipeline_service_pb2.ExecutePipelineRequest(
            inputs=inputs,
            request_id=request_id,
            omit_step_events=omit_step_events,
            cancel_on_disconnect=cancel_on_disconnect,
            batch_events=True,
        )
        if isinstance(pipeline, str):
            request.pipeline_id = pipeline
            request.pipeline_version = version
        else:
            request.pipeline.CopyFrom(pipeline)
        return request

    @staticmethod
    def upload_data(request: pipeline_service_pb2.ExecutePipelineRequest) -> dict[str, bytes] | None:
        """Each input's data when the request goes by ExecutePipelineUpload: inputs over UPLOAD_BYTES together, each
        with data of its own (otherwise the request goes in one message, as it is)."""
        if sum(image.ByteSize() for image in request.inputs.values()) <= UPLOAD_BYTES:
            return None
        data = {name: image.data for name, image in request.inputs.items()}
        return data if all(data.values()) else None

    @staticmethod
    def upload(
        request: pipeline_service_pb2.ExecutePipelineRequest, data: dict[str, bytes], await_go_ahead: bool = False
    ) -> Iterator[pipeline_service_pb2.ExecutePipelineUploadRequest]:
        """The request as ExecutePipelineUpload messages: the head (inputs without their data, and their lengths;
        `await_go_ahead` as given), then each input's data in pieces."""
        head = pipeline_service_pb2.ExecutePipelineRequest()
        for field, value in request.ListFields():
            if field.name != "inputs":
                head.MergeFrom(pipeline_service_pb2.ExecutePipelineRequest(**{field.name: value}))
        for name, image in request.inputs.items():
            head.inputs[name].MergeFrom(
                image_pb2.Image(media_type=image.media_type, width=image.width, height=image.height)
            )
        lengths = {name: len(bytes_) for name, bytes_ in data.items()}
        yield pipeline_service_pb2.ExecutePipelineUploadRequest(
            head=head, input_bytes=lengths, await_go_ahead=await_go_ahead
        )
        for name, bytes_ in data.items():
            for piece in pieces(bytes_):
                piece_message = pipeline_service_pb2.InputPiece(input=name, data=bytes(piece))
                yield pipeline_service_pb2.ExecutePipelineUploadRequest(piece=piece_message)


def _events_of(
    reply: pipeline_service_pb2.ExecutePipelineResponse
    | pipeline_service_pb2.ExecutePipelineUploadResponse
    | pipeline_service_pb2.WatchExecutionResponse,
) -> Sequence[execution_pb2.ExecutionEvent]:
    """The events of one stream response: the clients ask for batches (`batch_events`); a server that predates them
    answers one event per response."""
    if len(reply.events):
        return reply.events
    if isinstance(reply, pipeline_service_pb2.ExecutePipelineUploadResponse) and reply.go_ahead:
        return ()  # the go-ahead carries no event
    return (reply.event,)


_UPLOAD_REPLY = pipeline_service_pb2.ExecutePipelineUploadResponse


def _offers_go_ahead(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether an ExecutePipelineUpload's initial metadata says the server answers `await_go_ahead`."""
    return any(key == "imageflow-go-ahead" and value == "1" for key, value in metadata or ())


async def _read_on(call: Any) -> AsyncIterator[pipeline_service_pb2.ExecutePipelineUploadResponse]:
    """The replies left on a grpc.aio call already read with `read()` (which cannot be mixed with `async for`)."""
    while isinstance(reply := await call.read(), _UPLOAD_REPLY):  # not grpc.aio.EOF
        yield reply


def _left_out(outputs: Sequence[execution_pb2.StepOutput]) -> list[image_pb2.Image]:
    """Output images whose bytes the server left out of the message (over its message limit): read apart."""
    return [o.image for o in outputs if o.image.data_bytes and not o.image.data and o.image.blob_ref]


class _Acceptance:
    """Whether a server accepts an upload before it reads it (sends its initial metadata first): assumed, until one
    keeps a call waiting ACCEPT_WAIT_S; then it is not waited for again for LATE_RECHECK_S (a slow moment is not held
    against it for good)."""

    def __init__(self) -> None:
        self._late_until = 0.0

    def waits(self) -> bool:
        return time.monotonic() >= self._late_until

    def late(self) -> None:
        self._late_until = time.monotonic() + LATE_RECHECK_S


def _no_go_ahead() -> ImageflowClientError:
    return ImageflowClientError(
        "INTERNAL", "the server offered a go-ahead for the upload and answered its head with something else", []
    )


class _GoAhead:
    """The blocking client's upload: the head waits (at most ACCEPT_WAIT_S) for the server's initial metadata, to know
    whether it answers `await_go_ahead`; then the pieces wait for that answer, and are not sent when the call ended
    without it (a refused head)."""

    def __init__(self, acceptance: _Acceptance) -> None:
        self._acceptance = acceptance
        self._offered = threading.Event()
        self._answered = threading.Event()
        self._offers = False
        self._asked = False
        self._accepted = False

    def offer(self, offers: bool) -> None:
        """The server's initial metadata came: whether it answers a head that asks."""
        self._offers = offers
        self._offered.set()

    def accept(self) -> None:
        """The go-ahead came."""
        self._accepted = True
        self._answered.set()

    def watch(
        self, replies: Iterable[pipeline_service_pb2.ExecutePipelineUploadResponse]
    ) -> Iterator[pipeline_service_pb2.ExecutePipelineUploadResponse]:
        """The call's replies, taking the go-ahead as it passes."""
        for reply in replies:
            if reply.go_ahead:
                self.accept()
            elif self._asked and not self._accepted:
                raise _no_go_ahead()
            yield reply

    def close(self) -> None:
        """The call ended (or its reader stopped): nothing more waits."""
        self._offered.set()
        self._answered.set()

    def messages(
        self, request: pipeline_service_pb2.ExecutePipelineRequest, data: dict[str, bytes]
    ) -> Iterator[pipeline_service_pb2.ExecutePipelineUploadRequest]:
        if self._acceptance.waits() and not self._offered.wait(ACCEPT_WAIT_S):
            self._acceptance.late()  # a server that does not accept first: it gets the pieces anyway
        asks = self._asked = self._offers
        messages = _Requests.upload(request, data, await_go_ahead=asks)
        yield next(messages)  # the head
        if asks:
            self._answered.wait()
            if not self._accepted:
                return
        yield from messages


class _Pieces:
    """Counts a ReadExecutionOutput stream against the length its first message gives."""

    def __init__(self, blob_ref: str, offset: int) -> None:
        self._blob_ref = blob_ref
        self._at = offset
        self._length: int | None = None

    def take(self, reply: pipeline_service_pb2.ReadExecutionOutputResponse) -> bytes:
        if self._length is None:
            self._length = reply.data_bytes
        self._at += len(reply.data)
        return reply.data

    def check_complete(self) -> None:
        """DATA_LOSS when the stream ended before (or after) the output's length."""
        if self._length is not None and self._at != self._length:
            raise ImageflowClientError(
                "DATA_LOSS", f"output {self._blob_ref!r}: the stream ended at byte {self._at} of {self._length}", []
            )


def _violations(response: pipeline_service_pb2.GetPipelineResponse) -> list[tuple[str, str]]:
    return [(v.field, v.description) for v in response.violations]


class ImageflowClient:
    """Blocking client; every call of the API. `token` is sent as `authorization: Bearer` (an API key or a JWT);
    `credentials` (see `tls_credentials`) make the channel TLS; or pass a ready `channel` (then `target` and
    `credentials` are unused, and closing the client leaves the channel open)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self._owned = channel is None
        if channel is not None:
            self._channel = channel
        elif credentials is not None:
            self._channel = grpc.secure_channel(target, credentials, options=_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(target, options=_OPTIONS)
        self._pipelines = pipeline_service_pb2_grpc.PipelineServiceStub(self._channel)
        self._registry = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(self._channel)
        self._metadata = _auth_metadata(token)
        self._acceptance = _Acceptance()

    def close(self) -> None:
        """Close the channel (unless it was passed in)."""
        if self._owned:
            self._channel.close()

    def __enter__(self) -> ImageflowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata)
        except grpc.RpcError as error:
            raise ImageflowClientError.of(error) from None

    def _stream(
        self, method: Any, request: Any, timeout: float | None = None
    ) -> Iterator[execution_pb2.ExecutionEvent]:
        try:
            yield from self._events(method(request, timeout=timeout, metadata=self._metadata))
        except grpc.RpcError as error:
            raise ImageflowClientError.of(error) from None

    def _events(self, replies: Iterable[Any]) -> Iterator[execution_pb2.ExecutionEvent]:
        """A stream's events, each finished one with its left-out images read in."""
        for reply in replies:
            for event in _events_of(reply):
                if event.HasField("execution_finished"):
                    self._read_left_out(event.execution_id, event.execution_finished.outputs)
                yield event

    def _read_left_out(self, execution_id: str, outputs: Sequence[execution_pb2.StepOutput]) -> None:
        for image in _left_out(outputs):
            try:
                image.data = self.read_output(execution_id, image.blob_ref)
            except ImageflowClientError as error:
                if error.code != "NOT_FOUND":
                    raise
                # dropped after the server's retention: the event still comes, saying so as the server does
            image.ClearField("data_bytes")

    def generate(
        self,
        instruction: str,
        *,
        base_pipeline_id: str = "",
        base_pipeline_version: int = 0,
        base_pipeline: pipeline_pb2.Pipeline | None = None,
    ) -> pipeline_service_pb2.GeneratePipelineResponse:
        """Instruction -> validated pipeline (not saved); with a base, an edit of it."""
        request = _Requests.generate(instruction, base_pipeline_id, base_pipeline_version, base_pipeline)
        response: pipeline_service_pb2.GeneratePipelineResponse = self._call(self._pipelines.GeneratePipeline, request)
        return response

    def validate(self, pipeline: pipeline_pb2.Pipeline) -> pipeline_pb2.Pipeline:
        """The normalised definition, or ImageflowClientError with field violations."""
        request = pipeline_service_pb2.ValidatePipelineRequest(pipeline=pipeline)
        return self._call(self._pipelines.ValidatePipeline, request).pipeline  # type: ignore[no-any-return]

    def save(self, pipeline: pipeline_pb2.Pipeline) -> pipeline_pb2.Pipeline:
        """Store a new version (a pipeline with an id gets version n+1)."""
        request = pipeline_service_pb2.SavePipelineRequest(pipeline=pipeline)
        return self._call(self._pipelines.SavePipeline, request).pipeline  # type: ignore[no-any-return]

    def get(self, pipeline_id: str, version: int = 0) -> pipeline_pb2.Pipeline:
        """One version (0 = latest)."""
        request = pipeline_service_pb2.GetPipelineRequest(pipeline_id=pipeline_id, version=version)
        return self._call(self._pipelines.GetPipeline, request).pipeline  # type: ignore[no-any-return]

    def violations(self, pipeline_id: str, version: int = 0) -> list[tuple[str, str]]:
        """Why a saved version no longer validates against the registry (empty when it does)."""
        request = pipeline_service_pb2.GetPipelineRequest(pipeline_id=pipeline_id, version=version)
        return _violations(self._call(self._pipelines.GetPipeline, request))

    def list_pipelines(
        self, page_size: int = 50, page_token: str = "", *, only_stale: bool = False
    ) -> pipeline_service_pb2.ListPipelinesResponse:
        """A page of saved pipelines (latest versions)."""
        request = pipeline_service_pb2.ListPipelinesRequest(
            page_size=page_size, page_token=page_token, only_stale=only_stale
        )
        response: pipeline_service_pb2.ListPipelinesResponse = self._call(self._pipelines.ListPipelines, request)
        return response

    def delete(self, pipeline_id: str) -> int:
        """Delete every version; returns how many."""
        request = pipeline_service_pb2.DeletePipelineRequest(pipeline_id=pipeline_id)
        return int(self._call(self._pipelines.DeletePipeline, request).deleted_versions)

    def execute(
        self,
        pipeline: pipeline_pb2.Pipeline | str,
        inputs: dict[str, image_pb2.Image],
        *,
        version: int = 0,
        request_id: str = "",
        timeout: float | None = None,
        omit_step_events: bool = False,
        cancel_on_disconnect: bool = False,
    ) -> Iterator[execution_pb2.ExecutionEvent]:
        """Run a saved (id) or inline pipeline; yields events until execution_finished. Inputs over 8 MiB together
        go by ExecutePipelineUpload, in pieces (to a server that predates it, in one message)."""
        request = _Requests.execute(pipeline, inputs, version, request_id, omit_step_events, cancel_on_disconnect)
        data = _Requests.upload_data(request)
        if data is None:
            return self._stream(self._pipelines.ExecutePipeline, request, timeout)
        return self._upload(request, data, timeout)

    def _upload(
        self, request: pipeline_service_pb2.ExecutePipelineRequest, data: dict[str, bytes], timeout: float | None
    ) -> Iterator[execution_pb2.ExecutionEvent]:
        began = time.monotonic()
        events = self._upload_events(request, data, timeout)
        try:
            first = next(events)
        except StopIteration:
            return
        except ImageflowClientError as error:
            if error.code != "UNIMPLEMENTED":
                raise
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - began))
            yield from self._stream(self._pipelines.ExecutePipeline, request, left)
            return
        yield first
        yield from events

    def _upload_events(
        self, request: pipeline_service_pb2.ExecutePipelineRequest, data: dict[str, bytes], timeout: float | None
    ) -> Iterator[execution_pb2.ExecutionEvent]:
        """ExecutePipelineUpload's events; to a server that answers `await_go_ahead`, the pieces go only after its
        go-ahead (gRPC writes them from the messages' iterator on a thread of its own, which `_GoAhead` holds)."""
        gate = _GoAhead(self._acceptance)
        call: Any = None  # a grpc.Call and an iterator of replies (its stubs type it as the iterator only)
        try:
            call = self._pipelines.ExecutePipelineUpload(
                gate.messages(request, data), timeout=timeout, metadata=self._metadata
            )
            gate.offer(_offers_go_ahead(call.initial_metadata()))
            yield from self._events(gate.watch(call))
        except grpc.RpcError as error:
            raise ImageflowClientError.of(error) from None
        finally:
            gate.close()
            if call is not None:
                call.cancel()  # a caller that stopped early, or a broken go-ahead (after the end: nothing happens)

    def watch(self, execution_id: str, after_sequence: int = 0) -> Iterator[execution_pb2.ExecutionEvent]:
        """Replay the events after `after_sequence`, then follow until the execution finishes."""
        request = pipeline_service_pb2.WatchExecutionRequest(
            execution_id=execution_id, after_sequence=after_sequence, batch_events=True
        )
        return self._stream(self._pipelines.WatchExecution, request)

    def get_execution(self, execution_id: str) -> execution_pb2.Execution:
        """State, steps and outputs (images too large for one message read apart, as in `execute`)."""
        request = pipeline_service_pb2.GetExecutionRequest(execution_id=execution_id)
        execution: execution_pb2.Execution = self._call(self._pipelines.GetExecution, request).execution
        self._read_left_out(execution_id, execution.outputs)
        return execution

    def read_output_pieces(self, execution_id: str, blob_ref: str, offset: int = 0) -> Iterator[bytes]:
        """An output image's bytes from `offset`, in pieces of at most 1 MiB (to write a large output to a file
        without holding it whole)."""
        request = pipeline_service_pb2.ReadExecutionOutputRequest(
            execution_id=execution_id, blob_ref=blob_ref, offset=offset
        )
        pieces = _Pieces(blob_ref, offset)
        try:
            for reply in self._pipelines.ReadExecutionOutput(request, metadata=self._metadata):
                yield pieces.take(reply)
        except grpc.RpcError as error:
            raise ImageflowClientError.of(error) from None
        pieces.check_complete()

    def read_output(self, execution_id: str, blob_ref: str) -> bytes:
        """An output image's bytes by its `blob_ref`: what `execute`, `watch` and `get_execution` do for an image the
        server left out of a message (`data_bytes` set), and how to get any output again while it is retained."""
        return b"".join(self.read_output_pieces(execution_id, blob_ref))

    def cancel(self, execution_id: str) -> execution_pb2.Execution:
        """Cancel a running execution; returns its state."""
        request = pipeline_service_pb2.CancelExecutionRequest(execution_id=execution_id)
        return self._call(self._pipelines.CancelExecution, request).execution  # type: ignore[no-any-return]

    def tools(self) -> list[tool_pb2.Tool]:
        """Registered tools."""
        return list(self._call(self._registry.ListTools, tool_registry_service_pb2.ListToolsRequest()).tools)

    def get_tool(self, name: str) -> tool_pb2.Tool:
        """One registered tool."""
        request = tool_registry_service_pb2.GetToolRequest(name=name)
        return self._call(self._registry.GetTool, request).tool  # type: ignore[no-any-return]

    def register_tool(
        self, address: str, *, replace: bool = False, force: bool = False
    ) -> tool_registry_service_pb2.RegisterToolResponse:
        """Register the tools of a ToolService (admin); the response lists how changed manifests changed."""
        request = tool_registry_service_pb2.RegisterToolRequest(address=address, replace=replace, force=force)
        response: tool_registry_service_pb2.RegisterToolResponse = self._call(self._registry.RegisterTool, request)
        return response

    def remove_tool(self, name: str) -> int:
        """Remove a tool (admin); returns the registry version."""
        request = tool_registry_service_pb2.RemoveToolRequest(name=name)
        return int(self._call(self._registry.RemoveTool, request).registry_version)

    def import_triton_models(self, address: str, model_names: Sequence[str] = ()) -> list[tool_pb2.Tool]:
        """Import a Triton server's image models as tools (admin)."""
        request = tool_registry_service_pb2.ImportTritonModelsRequest(address=address, model_names=list(model_names))
        return list(self._call(self._registry.ImportTritonModels, request).tools)


class AsyncImageflowClient:
    """grpc.aio client with the same calls as ImageflowClient (`token`, `credentials` and `channel` likewise)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._owned = channel is None
        if channel is not None:
            self._channel = channel
        elif credentials is not None:
            self._channel = grpc.aio.secure_channel(target, credentials, options=_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=_OPTIONS)
        self._pipelines = pipeline_service_pb2_grpc.PipelineServiceStub(self._channel)
        self._registry = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(self._channel)
        self._metadata = _auth_metadata(token)
        self._acceptance = _Acceptance()

    async def close(self) -> None:
        """Close the channel (unless it was passed in)."""
        if self._owned:
            await self._channel.close(None)

    async def __aenter__(self) -> AsyncImageflowClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata)
        except grpc.RpcError as error:
            raise ImageflowClientError.of(error) from None

    async def _stream(
        self, method: Any, request: Any, timeout: float | None = None
    ) -> AsyncIterator[execution_pb2.ExecutionEvent]:
        try:
            async for event in self._events(method(request, timeout=timeout, metadata=self._metadata)):
                yield event
        except grpc.RpcError as error:
            raise ImageflowClientError.of(error) from None

    async def _events(self, replies: AsyncIterator[Any]) -> AsyncIterator[execution_pb2.ExecutionEvent]:
        """A stream's events, each finished one with its left-out images read in."""
        async for reply in replies:
            for event in _events_of(reply):
                if event.HasField("execution_finished"):
                    await self._read_left_out(event.execution_id, event.execution_finished.outputs)
                yield event

    async def _read_left_out(self, execution_id: str, outputs: Sequence[execution_pb2.StepOutput]) -> None:
        for image in _left_out(outputs):
            try:
                image.data = await self.read_output(execution_id, image.blob_ref)
            except ImageflowClientError as error:
                if error.code != "NOT_FOUND":
                    raise
                # dropped after the server's retention: the event still comes, saying so as the server does
            image.ClearField("data_bytes")

    async def generate(
        self,
        instruction: str,
        *,
        base_pipeline_id: str = "",
        base_pipeline_version: int = 0,
        base_pipeline: pipeline_pb2.Pipeline | None = None,
    ) -> pipeline_service_pb2.GeneratePipelineResponse:
        """Instruction -> validated pipeline (not saved); with a base, an edit of it."""
        request = _Requests.generate(instruction, base_pipeline_id, base_pipeline_version, base_pipeline)
        response: pipeline_service_pb2.GeneratePipelineResponse = await self._call(
            self._pipelines.GeneratePipeline, request
        )
        return response

    async def validate(self, pipeline: pipeline_pb2.Pipeline) -> pipeline_pb2.Pipeline:
        """The normalised definition, or ImageflowClientError with field violations."""
        request = pipeline_service_pb2.ValidatePipelineRequest(pipeline=pipeline)
        return (await self._call(self._pipelines.ValidatePipeline, request)).pipeline  # type: ignore[no-any-return]

    async def save(self, pipeline: pipeline_pb2.Pipeline) -> pipeline_pb2.Pipeline:
        """Store a new version (a pipeline with an id gets version n+1)."""
        request = pipeline_service_pb2.SavePipelineRequest(pipeline=pipeline)
        return (await self._call(self._pipelines.SavePipeline, request)).pipeline  # type: ignore[no-any-return]

    async def get(self, pipeline_id: str, version: int = 0) -> pipeline_pb2.Pipeline:
        """One version (0 = latest)."""
        request = pipeline_service_pb2.GetPipelineRequest(pipeline_id=pipeline_id, version=version)
        return (await self._call(self._pipelines.GetPipeline, request)).pipeline  # type: ignore[no-any-return]

    async def violations(self, pipeline_id: str, version: int = 0) -> list[tuple[str, str]]:
        """Why a saved version no longer validates against the registry (empty when it does)."""
        request = pipeline_service_pb2.GetPipelineRequest(pipeline_id=pipeline_id, version=version)
        return _violations(await self._call(self._pipelines.GetPipeline, request))

    async def list_pipelines(
        self, page_size: int = 50, page_token: str = "", *, only_stale: bool = False
    ) -> pipeline_service_pb2.ListPipelinesResponse:
        """A page of saved pipelines (latest versions)."""
        request = pipeline_service_pb2.ListPipelinesRequest(
            page_size=page_size, page_token=page_token, only_stale=only_stale
        )
        response: pipeline_service_pb2.ListPipelinesResponse = await self._call(self._pipelines.ListPipelines, request)
        return response

    async def delete(self, pipeline_id: str) -> int:
        """Delete every version; returns how many."""
        request = pipeline_service_pb2.DeletePipelineRequest(pipeline_id=pipeline_id)
        return int((await self._call(self._pipelines.DeletePipeline, request)).deleted_versions)

    def execute(
        self,
        pipeline: pipeline_pb2.Pipeline | str,
        inputs: dict[str, image_pb2.Image],
        *,
        version: int = 0,
        request_id: str = "",
        timeout: float | None = None,
        omit_step_events: bool = False,
        cancel_on_disconnect: bool = False,
    ) -> AsyncIterator[execution_pb2.ExecutionEvent]:
        """Run a saved (id) or inline pipeline; yields events until execution_finished. Inputs over 8 MiB together
        go by ExecutePipelineUpload, in pieces (to a server that predates it, in one message)."""
        request = _Requests.execute(pipeline, inputs, version, request_id, omit_step_events, cancel_on_disconnect)
        data = _Requests.upload_data(request)
        if data is None:
            return self._stream(self._pipelines.ExecutePipeline, request, timeout)
        return self._upload(request, data, timeout)

    async def _upload(
        self, request: pipeline_service_pb2.ExecutePipelineRequest, data: dict[str, bytes], timeout: float | None
    ) -> AsyncIterator[execution_pb2.ExecutionEvent]:
        """Writes nothing before the server has accepted the call (its initial metadata; at most ACCEPT_WAIT_S): a
        grpc.aio client still writing when a call ends gets INTERNAL in place of the server's status
        (grpc/grpc#36066), which would hide an UNIMPLEMENTED from a server that predates the upload, or a refusal."""
        began = time.monotonic()
        call = self._pipelines.ExecutePipelineUpload(None, timeout=timeout, metadata=self._metadata)
        try:
            go_ahead = False
            if self._acceptance.waits():
                try:
                    accepted = await asyncio.wait_for(asyncio.shield(call.initial_metadata()), ACCEPT_WAIT_S)
                    go_ahead = _offers_go_ahead(accepted)
                except TimeoutError:  # a server that does not accept first: it gets the pieces anyway
                    self._acceptance.late()
            if not call.done():
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):  # the status says why
                    messages = _Requests.upload(request, data, await_go_ahead=go_ahead)
                    await call.write(next(messages))  # the head
                    # to a server that answers, the pieces go once it accepts the head: a refusal costs no upload
                    answer = await call.read() if go_ahead else None
                    if isinstance(answer, _UPLOAD_REPLY) and not answer.go_ahead:
                        raise _no_go_ahead()
                    if not go_ahead or isinstance(answer, _UPLOAD_REPLY):
                        for message in messages:
                            await call.write(message)
                        await call.done_writing()
            async for event in self._events(_read_on(call)):
                yield event
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise ImageflowClientError.of(error) from None
        else:
            return
        finally:
            if not call.done():  # the consumer stopped early or was cancelled: end the call on the server too
                call.cancel()
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - began))
        async for event in self._stream(self._pipelines.ExecutePipeline, request, left):
            yield event

    def watch(self, execution_id: str, after_sequence: int = 0) -> AsyncIterator[execution_pb2.ExecutionEvent]:
        """Replay the events after `after_sequence`, then follow until the execution finishes."""
        request = pipeline_service_pb2.WatchExecutionRequest(
            execution_id=execution_id, after_sequence=after_sequence, batch_events=True
        )
        return self._stream(self._pipelines.WatchExecution, request)

    async def get_execution(self, execution_id: str) -> execution_pb2.Execution:
        """State, steps and outputs (images too large for one message read apart, as in `execute`)."""
        request = pipeline_service_pb2.GetExecutionRequest(execution_id=execution_id)
        execution: execution_pb2.Execution = (await self._call(self._pipelines.GetExecution, request)).execution
        await self._read_left_out(execution_id, execution.outputs)
        return execution

    async def read_output_pieces(self, execution_id: str, blob_ref: str, offset: int = 0) -> AsyncIterator[bytes]:
        """An output image's bytes from `offset`, in pieces of at most 1 MiB."""
        request = pipeline_service_pb2.ReadExecutionOutputRequest(
            execution_id=execution_id, blob_ref=blob_ref, offset=offset
        )
        pieces = _Pieces(blob_ref, offset)
        try:
            async for reply in self._pipelines.ReadExecutionOutput(request, metadata=self._metadata):
                yield pieces.take(reply)
        except grpc.RpcError as error:
            raise ImageflowClientError.of(error) from None
        pieces.check_complete()

    async def read_output(self, execution_id: str, blob_ref: str) -> bytes:
        """An output image's bytes by its `blob_ref` (see ImageflowClient.read_output)."""
        return b"".join([piece async for piece in self.read_output_pieces(execution_id, blob_ref)])

    async def cancel(self, execution_id: str) -> execution_pb2.Execution:
        """Cancel a running execution; returns its state."""
        request = pipeline_service_pb2.CancelExecutionRequest(execution_id=execution_id)
        return (await self._call(self._pipelines.CancelExecution, request)).execution  # type: ignore[no-any-return]

    async def tools(self) -> list[tool_pb2.Tool]:
        """Registered tools."""
        return list((await self._call(self._registry.ListTools, tool_registry_service_pb2.ListToolsRequest())).tools)

    async def get_tool(self, name: str) -> tool_pb2.Tool:
        """One registered tool."""
        request = tool_registry_service_pb2.GetToolRequest(name=name)
        return (await self._call(self._registry.GetTool, request)).tool  # type: ignore[no-any-return]

    async def register_tool(
        self, address: str, *, replace: bool = False, force: bool = False
    ) -> tool_registry_service_pb2.RegisterToolResponse:
        """Register the tools of a ToolService (admin); the response lists how changed manifests changed."""
        request = tool_registry_service_pb2.RegisterToolRequest(address=address, replace=replace, force=force)
        response: tool_registry_service_pb2.RegisterToolResponse = await self._call(
            self._registry.RegisterTool, request
        )
        return response

    async def remove_tool(self, name: str) -> int:
        """Remove a tool (admin); returns the registry version."""
        request = tool_registry_service_pb2.RemoveToolRequest(name=name)
        return int((await self._call(self._registry.RemoveTool, request)).registry_version)

    async def import_triton_models(self, address: str, model_names: Sequence[str] = ()) -> list[tool_pb2.Tool]:
        """Import a Triton server's image models as tools (admin)."""
        request = tool_registry_service_pb2.ImportTritonModelsRequest(address=address, model_names=list(model_names))
        return list((await self._call(self._registry.ImportTritonModels, request)).tools)
