"""gRPC transport to tool services: one long-lived channel per address, shared by every execution."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from opentelemetry.propagate import inject

from imageflow.common.errors import unavailable
from imageflow.common.serving import channel_options
from imageflow.server.executor import ToolCallError, ToolInvoker
from imageflow.v1 import tool_pb2, tool_service_pb2, tool_service_pb2_grpc


class ChannelPool:
    """Channels keyed by address; created on first use, closed together."""

    def __init__(self, max_message_bytes: int) -> None:
        self._options = [*channel_options(max_message_bytes), ("grpc.keepalive_time_ms", 30_000)]
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        """The shared channel to `address`."""
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)


class GrpcToolInvoker:
    """Calls ToolService/Process over the pool."""

    def __init__(self, pool: ChannelPool) -> None:
        self._pool = pool
        self._stubs: dict[str, tool_service_pb2_grpc.ToolServiceStub] = {}

    def _stub(self, address: str) -> tool_service_pb2_grpc.ToolServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            stub = tool_service_pb2_grpc.ToolServiceStub(self._pool.channel(address))
            self._stubs[address] = stub
        return stub

    async def process(
        self, address: str, request: tool_service_pb2.ProcessRequest, timeout_s: float
    ) -> tool_service_pb2.ProcessResponse:
        """One call; failures become ToolCallError with the status code name."""
        try:
            carrier: dict[str, str] = {}
            inject(carrier)  # W3C traceparent: tool spans join the step's trace
            call = self._stub(address).Process(request, timeout=timeout_s, metadata=tuple(carrier.items()))
            response: tool_service_pb2.ProcessResponse = await call  # type: ignore[misc]
        except grpc.aio.AioRpcError as error:
            raise ToolCallError(error.code().name, error.details() or "") from None
        return response


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


class RoutingInvoker:
    """Sends a step to its tool service, or to Triton when the registry says the tool is a Triton model."""

    def __init__(self, services: ToolInvoker, triton: ToolInvoker, is_triton_model: Callable[[str], bool]) -> None:
        self._services = services
        self._triton = triton
        self._is_triton_model = is_triton_model

    async def process(
        self, address: str, request: tool_service_pb2.ProcessRequest, timeout_s: float
    ) -> tool_service_pb2.ProcessResponse:
        """Dispatch by tool kind."""
        target = self._triton if self._is_triton_model(request.tool) else self._services
        return await target.process(address, request, timeout_s)
