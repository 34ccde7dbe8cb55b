"""The reference tools hosted inside the control plane (the `embedded` extra, imported only when it is on).

They still serve gRPC on loopback ports (so they register, describe and answer like any tool service), but a step
that uses one is a direct call on the service's ToolPlane: the input is decoded once at the first step, frames stay
numpy arrays between steps, and only outputs are encoded.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imageflow.common.errors import ImageflowError, failed_precondition
from imageflow.common.structs import dict_to_struct, struct_to_dict
from imageflow.server.domain.executor import ToolCallError, ToolResult
from imageflow.server.domain.frames import Frame, ImageHeader, serialized
from imageflow.server.settings import Settings
from imageflow.v1 import image_pb2, tool_service_pb2

if TYPE_CHECKING:
    from imageflow.tools.plane import ToolPlane
    from imageflow.tools.server import ToolServer

log = logging.getLogger(__name__)
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


@dataclass(frozen=True)
class PixelFrame:
    """A decoded frame (read-only numpy array) that stays in this process between embedded steps."""

    pixels: Any
    header: ImageHeader

    def serialized(self) -> bytes:
        """Raw pixels as a serialized Image, for a remote tool or an output."""
        return image_pb2.Image(
            data=self.pixels.tobytes(),
            media_type=self.header.media_type,
            width=self.header.width,
            height=self.header.height,
        ).SerializeToString()


class EmbeddedInvoker:
    """Calls the embedded tools' ToolPlanes directly, keyed by the loopback address each one registered."""

    def __init__(self, servers: list[ToolServer]) -> None:
        self._planes: dict[str, ToolPlane] = {server.address: server.servicer.plane for server in servers}

    def keeps_frames(self, address: str) -> bool:
        """True for the embedded services' addresses."""
        return address in self._planes

    async def process(
        self, address: str, request: tool_service_pb2.ProcessRequest, image: Frame, timeout_s: float
    ) -> ToolResult:
        """One step in process; tool errors become ToolCallError like a gRPC status would."""
        from imageflow.tools.servicer import detection_from_message, detection_message

        plane = self._planes[address]
        source: dict[str, Any]
        if isinstance(image, PixelFrame):
            source = {"pixels": image.pixels}
        else:
            message = image_pb2.Image.FromString(bytes(serialized(image)))
            source = {"data": message.data, "media_type": message.media_type}
            source.update(width=message.width, height=message.height)
        try:
            result = await asyncio.wait_for(
                plane.run(
                    request.tool,
                    struct_to_dict(request.params),
                    detections=[detection_from_message(d) for d in request.detections],
                    output_media_type=request.output_media_type,
                    output_quality=request.output_quality,
                    keep_pixels=True,
                    **source,
                ),
                timeout_s,
            )
        except TimeoutError:
            raise ToolCallError("DEADLINE_EXCEEDED", f"{request.tool} did not finish within {timeout_s:.3g} s") from None
        except ImageflowError as error:
            raise ToolCallError(error.kind.value, error.message) from None
        except Exception:
            log.exception("embedded tool %s failed", request.tool)
            raise ToolCallError("INTERNAL", f"{request.tool} failed; see the server log") from None
        header = ImageHeader(result.media_type, result.width, result.height)
        detections = [detection_message(d) for d in result.detections]
        metadata = dict_to_struct(result.metadata)
        if result.pixels is not None:
            return ToolResult(PixelFrame(result.pixels, header), header, detections, metadata)
        encoded = image_pb2.Image(data=result.data, media_type=result.media_type)
        encoded.width, encoded.height = result.width, result.height
        return ToolResult(encoded.SerializeToString(), header, detections, metadata)


__all__ = ["EmbeddedInvoker", "PixelFrame", "start_embedded_tools"]
