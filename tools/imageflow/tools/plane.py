"""The data plane of one tool service: the tools it serves, run on a worker pool. The gRPC servicer and the control
plane's in-process path both call it, so a step gives the same bytes either way."""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from imageflow.common.errors import ErrorKind, ImageflowError, invalid_argument, resource_exhausted
from imageflow.common.media import RAW_ANY, RAW_GRAY, RAW_TYPES
from imageflow.common.params import JsonObject
from imageflow.common.pieces import Buffer
from imageflow.tools.imaging import DecodedImage, ImageLimits, Pixels, decode, raw_media_type, to_gray
from imageflow.tools.runner import ProcessResult, check_quality, checked_params, process_decoded, reduction_for
from imageflow.tools.spec import Detection, ToolSpec

PARAMS_CACHE_SIZE = 1024
SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class ChainStepSpec:
    """One step of a chain: tool, params, input detections."""

    tool: str
    params: Mapping[str, Any]
    detections: Sequence[Detection] = ()


@dataclass(frozen=True)
class StepDone:
    """A finished chain step: its result (pixels kept unless it was the last) and how long it took."""

    result: ProcessResult
    seconds: float


@dataclass
class ChainResult:
    """What a chain produced: one StepDone per step that succeeded; on failure the step's index and error, and the
    last good image (None when the first step failed)."""

    done: list[StepDone]
    last_image: DecodedImage | None
    failure: tuple[int, ImageflowError] | None = None


class ToolPlane:
    """Runs a fixed set of tools; pixel work happens on worker threads so the event loop stays responsive."""

    def __init__(self, service: str, tools: tuple[ToolSpec, ...], limits: ImageLimits, workers: int = 4) -> None:
        self.service = service
        self.tools = {spec.name: spec for spec in tools}
        self.limits = limits
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{service}-worker")
        self._checked: OrderedDict[tuple[str, object], tuple[JsonObject, Callable[[JsonObject], JsonObject]]] = (
            OrderedDict()
        )
        """Checked params by key, with how to copy them (decided once, when they are checked)."""
        self._checked_lock = threading.Lock()

    def checked_params(self, spec: ToolSpec, params: Mapping[str, Any], output_quality: int) -> JsonObject:
        """Params validated against the tool's schema with defaults filled; the same params seen again (a saved
        pipeline run many times) skip the JSON Schema validation."""
        check_quality(output_quality)
        flat = all(isinstance(value, SCALARS) for value in params.values())
        # flat params (most tools') key on their sorted items with their types (True, 1, 1.0 differ; -0.0 and 0.0 do
        # not, and validate and act alike); nested ones on their JSON
        try:
            key = (
                spec.name,
                tuple(sorted((k, type(v), v) for k, v in params.items()))
                if flat
                else json.dumps(params, sort_keys=True),
            )
        except (TypeError, ValueError):
            return checked_params(spec, params, output_quality)
        with self._checked_lock:  # run() on the event loop and run_chain() on workers share it
            cached = self._checked.get(key)
            if cached is not None:
                self._checked.move_to_end(key)
        if cached is None:
            checked = checked_params(spec, params, output_quality)
            # each call gets its own copy (a tool may change what it is given); scalars need no deeper copy
            scalars = all(isinstance(value, SCALARS) for value in checked.values())
            cached = checked, (dict if scalars else copy.deepcopy)
            with self._checked_lock:
                self._checked[key] = cached
                if len(self._checked) > PARAMS_CACHE_SIZE:
                    self._checked.popitem(last=False)
        value, copied = cached
        return copied(value)

    def check_output(self, spec: ToolSpec, params: JsonObject, width: int, height: int) -> None:
        """RESOURCE_EXHAUSTED when the tool would make an image over the pixel limit (before it allocates one)."""
        if spec.output_size is None:
            return
        out_w, out_h = spec.output_size(params, width, height)
        if out_w * out_h > self.limits.max_pixels:
            raise resource_exhausted(
                "OUTPUT_TOO_MANY_PIXELS",
                f"{spec.name} would make a {out_w}x{out_h} = {out_w * out_h}-pixel image from {width}x{height}, "
                f"over the limit of {self.limits.max_pixels} pixels",
            )

    def spec(self, name: str) -> ToolSpec:
        """The tool called `name`, or INVALID_ARGUMENT naming what this service serves."""
        spec = self.tools.get(name)
        if spec is None:
            raise invalid_argument(
                "TOOL_UNKNOWN", f"tool {name!r} is not served by {self.service}; it serves {sorted(self.tools)}"
            )
        return spec

    async def run(
        self,
        tool: str,
        params: Mapping[str, Any],
        *,
        data: Buffer = b"",
        media_type: str = "",
        width: int = 0,
        height: int = 0,
        pixels: Pixels | None = None,
        detections: list[Detection] | None = None,
        output_media_type: str = "",
        output_quality: int = 0,
        keep_pixels: bool = False,
        omit_output: bool = False,
    ) -> ProcessResult:
        """One call: an encoded (or raw) image in `data`, or decoded `pixels` handed over in process. A chain of
        one step; its failure is raised."""
        chain = await self.run_chain(
            [ChainStepSpec(tool, params, detections or [])],
            data=data,
            media_type=media_type,
            width=width,
            height=height,
            pixels=pixels,
            output_media_type=output_media_type,
            output_quality=output_quality,
            keep_pixels=keep_pixels,
            omit_output=omit_output,
        )
        if chain.failure is not None:
            raise chain.failure[1]
        return chain.done[0].result

    async def run_chain(
        self,
        steps: Sequence[ChainStepSpec],
        *,
        data: Buffer = b"",
        media_type: str = "",
        width: int = 0,
        height: int = 0,
        pixels: Pixels | None = None,
        output_media_type: str = "",
        output_quality: int = 0,
        keep_pixels: bool = False,
        omit_output: bool = False,
        progress: Callable[[int, StepDone], None] | None = None,
        planes: Sequence[ToolPlane] | None = None,
        timeout_s: float | None = None,
    ) -> ChainResult:
        """Consecutive steps in one worker job: raw pixels between steps, the last output encoded as asked (an
        `encode` step inside the chain overriding the request as it would between separate calls). A failing step
        ends the chain as data. `progress` is called from the worker thread as each step finishes. `planes` names
        the plane that serves each step when they are not all this one (tool services hosted in one process: the
        frame stays in this worker between them); each step is checked against its own plane's tools and limits.
        With `omit_output` the last step's result has the output's type and size but no image (nobody reads it).
        Past `timeout_s` the call raises TimeoutError and the worker stops after the step it is in."""
        if not steps:
            raise invalid_argument("CHAIN_EMPTY", "a chain needs at least one step")
        owners = list(planes) if planes is not None else [self] * len(steps)
        if len(owners) != len(steps):
            raise ValueError(f"{len(steps)} steps but {len(owners)} planes")
        specs = [owner.spec(step.tool) for owner, step in zip(owners, steps, strict=True)]
        check_quality(output_quality)
        luma = luma_only(specs, output_media_type)

        abandoned = threading.Event()

        def work() -> ChainResult:
            done: list[StepDone] = []
            image: DecodedImage | None = None
            source: Buffer | None = None
            wanted, quality = output_media_type, output_quality
            for index, (step, spec, owner) in enumerate(zip(steps, specs, owners, strict=True)):
                if abandoned.is_set():  # the caller gave up (deadline, cancel): do not start the next step
                    return ChainResult(
                        done,
                        image,
                        failure=(
                            index,
                            ImageflowError(ErrorKind.CANCELLED, "CANCELLED", "the caller cancelled the call"),
                        ),
                    )
                began = time.perf_counter()
                last = index == len(steps) - 1
                try:
                    checked = owner.checked_params(spec, step.params, 0)
                    if image is None:
                        if pixels is not None:
                            frame = to_gray(pixels) if luma else pixels
                            image = DecodedImage(frame, raw_media_type(frame))
                        else:
                            decoded = decode(
                                data,
                                media_type,
                                width,
                                height,
                                owner.limits,
                                reduction_for(spec, checked),
                                on_header=functools.partial(owner.check_output, spec, checked),
                                luma=luma,
                            )
                            image, source = decoded, data
                    height_now, width_now = image.pixels.shape[:2]
                    owner.check_output(spec, checked, *(image.source_size or (width_now, height_now)))
                    result = process_decoded(
                        spec,
                        checked,
                        image,
                        source_data=source,
                        detections=list(step.detections),
                        output_media_type=wanted if last else RAW_ANY,
                        output_quality=quality if last else 0,
                        keep_pixels=keep_pixels or not last,
                        omit_image=omit_output and last,
                    )
                except ImageflowError as error:
                    return ChainResult(done, image, failure=(index, error))
                encoded_as = result.metadata.get("encode_media_type")
                if isinstance(encoded_as, str) and wanted not in (RAW_ANY, *RAW_TYPES):
                    wanted = encoded_as
                    quality = int(result.metadata.get("encode_quality", 0) or 0)
                outcome = StepDone(result, time.perf_counter() - began)
                done.append(outcome)
                if progress is not None:
                    progress(index, outcome)
                if result.pixels is not None:
                    image, source = DecodedImage(result.pixels, result.media_type), None
            return ChainResult(done, image)

        job = asyncio.get_running_loop().run_in_executor(self._pool, work)
        try:  # the deadline on the caller's own wait for the job: no task, shield or second future around it (turns
            # of the loop fewer); cancelling the job only keeps a queued one from starting: a running one is stopped
            # by `abandoned`
            async with asyncio.timeout(timeout_s):
                return await job
        except (asyncio.CancelledError, TimeoutError):
            abandoned.set()  # the thread finishes the step it is in (OpenCV cannot be interrupted), then stops
            raise

    def close(self) -> None:
        """Stop the worker threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def luma_only(specs: Sequence[ToolSpec], output_media_type: str) -> bool:
    """Whether a chain's input is needed only as gray: its first steps keep luma (geometry) up to one that reads
    only luma (grayscale, threshold, edge_detect), or they all keep luma and the caller asked for a raw gray output
    (the control plane does when the image goes only to such tools). Then the input is decoded as luma alone."""
    for spec in specs:
        if spec.reads_luma:
            return True
        if not spec.keeps_luma:
            return False
    return output_media_type == RAW_GRAY
