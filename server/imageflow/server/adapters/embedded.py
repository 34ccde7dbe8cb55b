"""The reference tools hosted inside the control plane (the `embedded` extra, imported only when it is on).

They still serve gRPC on loopback ports (so they register, describe and answer like any tool service), but a step
that uses one is a direct call on the service's ToolPlane: the input is decoded once at the first step, frames stay
numpy arrays between steps, and only outputs are encoded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imageflow.common.errors import ImageflowError, failed_precondition
from imageflow.common.structs import dict_to_struct, struct_to_dict
from imageflow.common.wire import split_field
from imageflow.server.adapters.wire import image_header
from imageflow.server.domain.executor import ChainOutcome, StepCallback, ToolCallError, ToolResult
from imageflow.server.domain.frames import Frame, ImageHeader, inline
from imageflow.server.settings import Settings
from imageflow.v1 import image_pb2, tool_service_pb2

if TYPE_CHECKING:
    from imageflow.tools.plane import StepDone, ToolPlane
    from imageflow.tools.runner import ProcessResult
    from imageflow.tools.server import ToolServer

log = logging.getLogger(__name__)
EMBEDDED_SERVICES = ("resize", "filter", "detection")
IMAGE_DATA_FIELD = image_pb2.Image.DESCRIPTOR.fields_by_name["data"].number
EMBEDDED_GROUP = "embedded"
"""The chain group of the embedded pixel services' addresses."""
CHAINED_ACROSS = ("resize", "filter")
"""The embedded services whose steps chain with each other's."""
PROGRESS_WINDOW_S = 0.001
"""The longest a finished step of an embedded chain waits to be reported, when another was reported just before."""


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
        self._grouped = {server.address for server in servers if server.kind in CHAINED_ACROSS}

    def keeps_frames(self, address: str) -> bool:
        """True for the embedded services' addresses."""
        return address in self._planes

    def chain_group(self, address: str) -> str:
        """For the compiler: the embedded resize and filter services are one group (a run of steps across them is one
        worker job here, as a run on one remote service is one call); any other address, detection's included (its
        inference keeps its own workers and their bound), is its own."""
        return EMBEDDED_GROUP if address in self._grouped else address

    async def process(
        self, address: str, request: tool_service_pb2.ProcessRequest, image: Frame, timeout_s: float
    ) -> ToolResult:
        """One step in process (a chain of one); tool errors become ToolCallError like a gRPC status would."""
        results: list[ToolResult] = []
        outcome = await self.process_chain(address, [request], image, timeout_s, lambda _, r, __: results.append(r))
        if outcome.failure is None or results:  # finished (a deadline expiring in the same turn still counts)
            return results[0]
        raise outcome.failure

    async def process_chain(
        self,
        address: str,
        requests: Sequence[tool_service_pb2.ProcessRequest],
        image: Frame,
        timeout_s: float,
        on_step: StepCallback,
        addresses: Sequence[str] | None = None,
    ) -> ChainOutcome:
        """The whole run in one worker job (on the first step's plane's workers); each step runs on the plane at its
        own address (`addresses`, for a chain across the embedded services) and is reported on the event loop as it
        happens."""
        from imageflow.tools.plane import ChainStepSpec
        from imageflow.tools.servicer import detection_from_message

        at = list(addresses) if addresses is not None else [address] * len(requests)
        if len(at) != len(requests) or any(a not in self._planes for a in at):
            raise ToolCallError("INTERNAL", f"a chain sent to {address} names a service not hosted in this process")
        planes = [self._planes[a] for a in at]
        loop = asyncio.get_running_loop()
        last = len(requests) - 1
        # Steps are reported only while this call is live: a worker that outlives its deadline or a cancel (threads
        # cannot be stopped) must not report steps of an attempt the executor has already given up on.
        attempt = {"live": True, "reported": 0}

        def deliver(index: int, result: ToolResult, seconds: float) -> None:
            if attempt["live"]:
                attempt["reported"] = index + 1
                on_step(index, result, seconds)

        relay = _ProgressRelay(loop, deliver)

        def progress(index: int, done: StepDone) -> None:
            # the last step wakes nobody: the chain's end wakes the loop anyway, and `flush` reports it first
            relay.put(index, _tool_result(done.result, final=index == last), done.seconds, wake=index != last)

        steps = [
            ChainStepSpec(r.tool, struct_to_dict(r.params), [detection_from_message(d) for d in r.detections])
            for r in requests
        ]
        try:
            source = _source(image)
            chain = await planes[0].run_chain(
                steps,
                planes=planes,
                output_media_type=requests[-1].output_media_type,
                output_quality=requests[-1].output_quality,
                keep_pixels=True,
                omit_output=requests[-1].omit_output_image,
                progress=progress,
                timeout_s=timeout_s,
                **source,
            )
        except asyncio.CancelledError:
            attempt["live"] = False  # given up on: nothing more is reported
            relay.close()
            raise
        except Exception as error:  # noqa: BLE001 - every failure becomes the step's outcome below
            failure: Exception | None = error
        else:
            failure = None
        relay.close()
        relay.flush()  # every step the worker finished (before a deadline too) is reported before the outcome is used
        attempt["live"] = False
        if failure is not None:
            return ChainOutcome(attempt["reported"], _call_error(failure, requests, timeout_s), None)
        if chain.failure is None:
            return ChainOutcome(len(chain.done))
        index, chain_error = chain.failure
        frame = None
        if chain.done and chain.last_image is not None:
            pixels = chain.last_image.pixels
            frame = PixelFrame(
                pixels, ImageHeader(chain.last_image.source_media_type, pixels.shape[1], pixels.shape[0])
            )
        return ChainOutcome(
            index, ToolCallError(chain_error.kind.value, chain_error.message, chain_error.reason), frame
        )


def _call_error(
    error: Exception, requests: Sequence[tool_service_pb2.ProcessRequest], timeout_s: float
) -> ToolCallError:
    """What a chain that raised tells the executor."""
    if isinstance(error, TimeoutError):
        message = f"{', '.join(r.tool for r in requests)} did not finish within {timeout_s:.3g} s"
        return ToolCallError("DEADLINE_EXCEEDED", message)
    if isinstance(error, ImageflowError):
        return ToolCallError(error.kind.value, error.message, error.reason)
    log.error("embedded chain %s failed", [r.tool for r in requests], exc_info=error)
    return ToolCallError("INTERNAL", "an embedded tool failed; see the server log")


class _ProgressRelay:
    """Carries the steps a worker thread finishes to the event loop. The first finished step wakes the loop at once;
    steps finishing within PROGRESS_WINDOW_S after a delivery wait for the next look, which takes them all. So a run
    of fast steps (small frames: tens of microseconds each) costs a few wake-ups of the loop and a few store writes
    and stream messages, not one each; a step that takes longer than the window is reported as soon as it ends."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, deliver: StepCallback, window_s: float = PROGRESS_WINDOW_S
    ) -> None:
        self._loop = loop
        self._deliver = deliver
        self._window_s = window_s
        self._lock = threading.Lock()
        self._ready: list[tuple[int, ToolResult, float]] = []
        self._armed = False  # a look is queued or timed; `put` need not wake the loop
        self._timer: asyncio.TimerHandle | None = None

    def put(self, index: int, result: ToolResult, seconds: float, *, wake: bool = True) -> None:
        """From the worker thread. Without `wake` the step waits for a look already due, or for `flush`."""
        with self._lock:
            self._ready.append((index, result, seconds))
            if not wake or self._armed:
                return
            self._armed = True
        self._loop.call_soon_threadsafe(self._look)

    def flush(self) -> None:
        """On the loop: deliver everything finished so far, now."""
        with self._lock:
            taken, self._ready = self._ready, []
        for item in taken:
            self._deliver(*item)

    def close(self) -> None:
        """On the loop, when the chain is over: no more timed looks."""
        if self._timer is not None:
            self._timer.cancel()

    def _look(self) -> None:
        self._timer = None
        with self._lock:
            taken, self._ready = self._ready, []
            if not taken:
                self._armed = False  # the next `put` wakes the loop itself
                return
        try:
            for item in taken:
                self._deliver(*item)
        finally:  # still armed: keep looking, even if a delivery raised
            self._timer = self._loop.call_later(self._window_s, self._look)


def _source(image: Frame) -> dict[str, Any]:
    """ToolPlane keyword arguments for a frame: pixels kept here, or the serialized Image's fields."""
    if isinstance(image, PixelFrame):
        return {"pixels": image.pixels}
    data, rest = split_field(inline(image), IMAGE_DATA_FIELD)  # the encoded bytes are copied once, not three times
    header = image_header(rest)
    return {"data": bytes(data), "media_type": header.media_type, "width": header.width, "height": header.height}


def _tool_result(result: ProcessResult, *, final: bool) -> ToolResult:
    """A ToolPlane result for the executor: pixels stay a PixelFrame, encoded output a serialized Image; a step
    inside a chain hands nothing on (the next step already has its pixels)."""
    from imageflow.tools.servicer import detection_message

    header = ImageHeader(result.media_type, result.width, result.height)
    detections = [detection_message(d) for d in result.detections]
    metadata = dict_to_struct(result.metadata)
    if not final:
        return ToolResult(b"", header, detections, metadata)
    if result.pixels is not None:
        return ToolResult(PixelFrame(result.pixels, header), header, detections, metadata)
    encoded = image_pb2.Image(data=result.data, media_type=result.media_type)
    encoded.width, encoded.height = result.width, result.height
    return ToolResult(encoded.SerializeToString(), header, detections, metadata)


__all__ = ["EmbeddedInvoker", "PixelFrame", "start_embedded_tools"]
