"""The reference tools hosted inside the control plane (the `embedded` extra, imported only when it is on)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imageflow.common.errors import failed_precondition
from imageflow.server.settings import Settings

if TYPE_CHECKING:
    from imageflow.tools.server import ToolServer

EMBEDDED_SERVICES = ("resize", "filter", "detection")


async def start_embedded_tools(settings: Settings) -> list[ToolServer]:
    """Start resize, filter and detection on loopback ports; the caller registers them."""
    try:
        from imageflow.tools.catalog import DEFAULT_MODEL_REPOSITORY
        from imageflow.tools.server import start_tool_server
    except ImportError as error:  # pragma: no cover - depends on how the server was installed
        raise failed_precondition(
            "EMBEDDED_TOOLS_NOT_INSTALLED",
            "IMAGEFLOW_EMBEDDED_TOOLS is on but the reference tools are not installed: "
            "install imageflow-server[embedded] or set IMAGEFLOW_EMBEDDED_TOOLS=false",
        ) from error
    repository = settings.model_repository or DEFAULT_MODEL_REPOSITORY
    servers: list[ToolServer] = []
    for kind in EMBEDDED_SERVICES:
        servers.append(
            await start_tool_server(
                kind,
                max_message_bytes=settings.tool_max_message_bytes,
                model_repository=repository,
                triton_url=settings.triton_url,
                triton_shared_memory=settings.triton_shared_memory,
            )
        )
    return servers
