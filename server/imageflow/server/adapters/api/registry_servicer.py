"""imageflow.v1.ToolRegistryService: translation only."""

from __future__ import annotations

from typing import Any

import grpc
from imageflow.server.domain.access import current_principal
from imageflow.server.domain.registry import Registry
from imageflow.v1 import tool_registry_service_pb2 as reg
from imageflow.v1 import tool_registry_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class ToolRegistryServicer(tool_registry_service_pb2_grpc.ToolRegistryServiceServicer):
    """Maps each RPC onto the registry."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def RegisterTool(self, request: reg.RegisterToolRequest, context: Context) -> reg.RegisterToolResponse:
        """Describe and store."""
        done = await self._registry.register(
            request.address, replace=request.replace, force=request.force, actor=current_principal()
        )
        return reg.RegisterToolResponse(
            tools=done.tools,
            registry_version=self._registry.version,
            changes=[
                reg.ToolChange(tool=name, breaking=c.breaking, field=c.field, description=c.description)
                for name, changes in done.changes.items()
                for c in changes
            ],
        )

    async def ListTools(self, request: reg.ListToolsRequest, context: Context) -> reg.ListToolsResponse:
        """All tools."""
        return reg.ListToolsResponse(tools=self._registry.list(), registry_version=self._registry.version)

    async def GetTool(self, request: reg.GetToolRequest, context: Context) -> reg.GetToolResponse:
        """One tool."""
        return reg.GetToolResponse(tool=self._registry.get(request.name))

    async def RemoveTool(self, request: reg.RemoveToolRequest, context: Context) -> reg.RemoveToolResponse:
        """Remove one tool."""
        return reg.RemoveToolResponse(registry_version=await self._registry.remove(request.name, current_principal()))

    async def ImportTritonModels(
        self, request: reg.ImportTritonModelsRequest, context: Context
    ) -> reg.ImportTritonModelsResponse:
        """Import Triton image models as tools."""
        done = await self._registry.import_triton(request.address, list(request.model_names), actor=current_principal())
        return reg.ImportTritonModelsResponse(tools=done.tools, registry_version=self._registry.version)
