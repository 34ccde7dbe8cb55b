"""A typed client (async and sync) for imageflow.v1; gRPC errors become ImageflowClientError with field violations."""

from __future__ import annotations

import functools
import mimetypes
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import grpc
from imageflow.common.grpc_errors import error_from_rpc
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
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
P = ParamSpec("P")
R = TypeVar("R")


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


def image_from_file(path: Path) -> image_pb2.Image:
    """Read an image file as protobuf bytes (the server sniffs the format)."""
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


def _translated(method: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except grpc.RpcError as error:
            raise ImageflowClientError.of(error) from None

    return wrapper


class ImageflowClient:
    """Blocking client. `token` is sent as `authorization: Bearer` (an API key or a JWT); `credentials` (see
    `tls_credentials`) make the channel TLS; or pass a ready `channel` (then `target` and `credentials` are unused,
    and closing the client leaves the channel open)."""

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

    def close(self) -> None:
        """Close the channel (unless it was passed in)."""
        if self._owned:
            self._channel.close()

    def __enter__(self) -> ImageflowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @_translated
    def generate(
        self, instruction: str, *, base_pipeline_id: str = "", base_pipeline: pipeline_pb2.Pipeline | None = None
    ) -> pipeline_service_pb2.GeneratePipelineResponse:
        """Instruction -> pipeline (not saved)."""
        request = pipeline_service_pb2.GeneratePipelineRequest(instruction=instruction)
        if base_pipeline_id:
            request.base_pipeline_id = base_pipeline_id
        elif base_pipeline is not None:
            request.base_pipeline.CopyFrom(base_pipeline)
        response: pipeline_service_pb2.GeneratePipelineResponse = self._pipelines.GeneratePipeline(
            request, metadata=self._metadata
        )
        return response

    @_translated
    def validate(self, pipeline: pipeline_pb2.Pipeline) -> pipeline_pb2.Pipeline:
        """Normalised definition, or ImageflowClientError with violations."""
        response = self._pipelines.ValidatePipeline(
            pipeline_service_pb2.ValidatePipelineRequest(pipeline=pipeline), metadata=self._metadata
        )
        return response.pipeline

    @_translated
    def save(self, pipeline: pipeline_pb2.Pipeline) -> pipeline_pb2.Pipeline:
        """Store a new version."""
        response = self._pipelines.SavePipeline(
            pipeline_service_pb2.SavePipelineRequest(pipeline=pipeline), metadata=self._metadata
        )
        return response.pipeline

    @_translated
    def get(self, pipeline_id: str, version: int = 0) -> pipeline_pb2.Pipeline:
        """One version (0 = latest)."""
        response = self._pipelines.GetPipeline(
            pipeline_service_pb2.GetPipelineRequest(pipeline_id=pipeline_id, version=version), metadata=self._metadata
        )
        return response.pipeline

    @_translated
    def list_pipelines(self, page_size: int = 50, page_token: str = "") -> pipeline_service_pb2.ListPipelinesResponse:
        """A page of pipelines."""
        response: pipeline_service_pb2.ListPipelinesResponse = self._pipelines.ListPipelines(
            pipeline_service_pb2.ListPipelinesRequest(page_size=page_size, page_token=page_token),
            metadata=self._metadata,
        )
        return response

    @_translated
    def delete(self, pipeline_id: str) -> int:
        """Delete every version."""
        response = self._pipelines.DeletePipeline(
            pipeline_service_pb2.DeletePipelineRequest(pipeline_id=pipeline_id), metadata=self._metadata
        )
        return int(response.deleted_versions)

    def execute(
        self,
        pipeline: pipeline_pb2.Pipeline | str,
        inputs: dict[str, image_pb2.Image],
        *,
        version: int = 0,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Iterator[execution_pb2.ExecutionEvent]:
        """Run a saved (id) or inline pipeline; yields events until execution_finished."""
        request = pipeline_service_pb2.ExecutePipelineRequest(
            inputs=inputs, request_id=request_id, pipeline_version=version
        )
        if isinstance(pipeline, str):
            request.pipeline_id = pipeline
        else:
            request.pipeline.CopyFrom(pipeline)
        try:
            for reply in self._pipelines.ExecutePipeline(request, timeout=timeout, metadata=self._metadata):
                yield reply.event
        except grpc.RpcError as error:
            raise ImageflowClientError.of(error) from None

    def watch(self, execution_id: str, after_sequence: int = 0) -> Iterator[execution_pb2.ExecutionEvent]:
        """Replay and follow an execution's events."""
        request = pipeline_service_pb2.WatchExecutionRequest(execution_id=execution_id, after_sequence=after_sequence)
        try:
            for reply in self._pipelines.WatchExecution(request, metadata=self._metadata):
                yield reply.event
        except grpc.RpcError as error:
            raise ImageflowClientError.of(error) from None

    @_translated
    def get_execution(self, execution_id: str) -> execution_pb2.Execution:
        """Current state."""
        response = self._pipelines.GetExecution(
            pipeline_service_pb2.GetExecutionRequest(execution_id=execution_id), metadata=self._metadata
        )
        return response.execution

    @_translated
    def cancel(self, execution_id: str) -> execution_pb2.Execution:
        """Cancel a running execution."""
        response = self._pipelines.CancelExecution(
            pipeline_service_pb2.CancelExecutionRequest(execution_id=execution_id), metadata=self._metadata
        )
        return response.execution

    @_translated
    def tools(self) -> list[tool_pb2.Tool]:
        """Registered tools."""
        response = self._registry.ListTools(tool_registry_service_pb2.ListToolsRequest(), metadata=self._metadata)
        return list(response.tools)

    @_translated
    def register_tool(self, address: str, *, replace: bool = False) -> list[tool_pb2.Tool]:
        """Register the tools of a ToolService."""
        response = self._registry.RegisterTool(
            tool_registry_service_pb2.RegisterToolRequest(address=address, replace=replace), metadata=self._metadata
        )
        return list(response.tools)


class AsyncImageflowClient:
    """grpc.aio client with the same calls; `token`, `credentials` and `channel` as for ImageflowClient."""

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

    async def close(self) -> None:
        """Close the channel (unless it was passed in)."""
        if self._owned:
            await self._channel.close(None)

    async def __aenter__(self) -> AsyncImageflowClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, call: Any, request: Any) -> Any:
        try:
            return await call(request, metadata=self._metadata)
        except grpc.RpcError as error:
            raise ImageflowClientError.of(error) from None

    async def generate(
        self, instruction: str, *, base_pipeline_id: str = ""
    ) -> pipeline_service_pb2.GeneratePipelineResponse:
        """Instruction -> pipeline."""
        request = pipeline_service_pb2.GeneratePipelineRequest(instruction=instruction)
        if base_pipeline_id:
            request.base_pipeline_id = base_pipeline_id
        response: pipeline_service_pb2.GeneratePipelineResponse = await self._unary(
            self._pipelines.GeneratePipeline, request
        )
        return response

    async def validate(self, pipeline: pipeline_pb2.Pipeline) -> pipeline_pb2.Pipeline:
        """Normalised definition."""
        response = await self._unary(
            self._pipelines.ValidatePipeline, pipeline_service_pb2.ValidatePipelineRequest(pipeline=pipeline)
        )
        return response.pipeline  # type: ignore[no-any-return]

    async def save(self, pipeline: pipeline_pb2.Pipeline) -> pipeline_pb2.Pipeline:
        """Store a new version."""
        response = await self._unary(
            self._pipelines.SavePipeline, pipeline_service_pb2.SavePipelineRequest(pipeline=pipeline)
        )
        return response.pipeline  # type: ignore[no-any-return]

    async def get(self, pipeline_id: str, version: int = 0) -> pipeline_pb2.Pipeline:
        """One version."""
        response = await self._unary(
            self._pipelines.GetPipeline,
            pipeline_service_pb2.GetPipelineRequest(pipeline_id=pipeline_id, version=version),
        )
        return response.pipeline  # type: ignore[no-any-return]

    async def execute(
        self, pipeline: pipeline_pb2.Pipeline | str, inputs: dict[str, image_pb2.Image], *, request_id: str = ""
    ) -> AsyncIterator[execution_pb2.ExecutionEvent]:
        """Run; yields events."""
        request = pipeline_service_pb2.ExecutePipelineRequest(inputs=inputs, request_id=request_id)
        if isinstance(pipeline, str):
            request.pipeline_id = pipeline
        else:
            request.pipeline.CopyFrom(pipeline)
        try:
            async for reply in self._pipelines.ExecutePipeline(request, metadata=self._metadata):
                yield reply.event
        except grpc.RpcError as error:
            raise ImageflowClientError.of(error) from None

    async def watch(self, execution_id: str, after_sequence: int = 0) -> AsyncIterator[execution_pb2.ExecutionEvent]:
        """Replay and follow."""
        request = pipeline_service_pb2.WatchExecutionRequest(execution_id=execution_id, after_sequence=after_sequence)
        try:
            async for reply in self._pipelines.WatchExecution(request, metadata=self._metadata):
                yield reply.event
        except grpc.RpcError as error:
            raise ImageflowClientError.of(error) from None

    async def cancel(self, execution_id: str) -> execution_pb2.Execution:
        """Cancel."""
        response = await self._unary(
            self._pipelines.CancelExecution, pipeline_service_pb2.CancelExecutionRequest(execution_id=execution_id)
        )
        return response.execution  # type: ignore[no-any-return]

    async def tools(self) -> list[tool_pb2.Tool]:
        """Registered tools."""
        response = await self._unary(self._registry.ListTools, tool_registry_service_pb2.ListToolsRequest())
        return list(response.tools)
