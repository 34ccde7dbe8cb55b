"""DAG executor: dependency-ready scheduling, retries, failure policies, cancellation, events (no grpc here)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import graphlib
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration
from imageflow.common.errors import SIZE_LIMIT_REASONS, invalid_argument, not_found, resource_exhausted, unavailable
from imageflow.common.media import RAW_ANY, RAW_GRAY, RAW_TYPES
from imageflow.server.domain import instruments as telemetry
from imageflow.server.domain.compiler import CompiledPipeline, CompiledStep
from imageflow.server.domain.events import EventHub, ExecutionLog, state_name, with_outputs
from imageflow.server.domain.frames import Frame, ImageHeader, InputImage, serialized
from imageflow.server.domain.outputs import fit_result
from imageflow.server.domain.probe import probe
from imageflow.server.domain.store import ACTIVE_STATES, ExecutionRow, Store
from imageflow.v1 import execution_pb2, image_pb2, pipeline_pb2, tool_service_pb2
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

log = logging.getLogger(__name__)

RETRYABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})
LOSSLESS_LARGE = "image/png"
INTERRUPTED_MESSAGE = "interrupted: the server stopped while this execution was running"
DRAIN_MESSAGE = "interrupted: the server was shut down (SIGTERM) before this execution finished"
S = execution_pb2


MAX_TOOL_MESSAGE = 500
"""The most characters of a tool's error message kept (in step events and GetExecution's step states)."""


class ToolCallError(Exception):
    """A tool call failed with a gRPC status code (by name) and the tool's message."""

    def __init__(self, code: str, message: str, reason: str = "") -> None:
        message = message if len(message) <= MAX_TOOL_MESSAGE else message[: MAX_TOOL_MESSAGE - 1] + "…"
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reason = reason

    @property
    def retryable(self) -> bool:
        """Whether another attempt may succeed (not when an input or output is over a size limit)."""
        return self.code in RETRYABLE_CODES and self.reason not in SIZE_LIMIT_REASONS


@dataclass
class ToolResult:
    """A tool's answer: the output image still serialized (an imageflow.v1.Image) or kept local by the invoker, its
    header, detections, metadata."""

    image: Frame
    header: ImageHeader
    detections: list[image_pb2.Detection] = field(default_factory=list)
    metadata: struct_pb2.Struct = field(default_factory=struct_pb2.Struct)


@dataclass
class ChainOutcome:
    """How a chain call ended: the steps that succeeded went to `on_step`; on failure, the failing step's error and
    the output of the last step that succeeded (None when the first one failed)."""

    completed: int
    failure: ToolCallError | None = None
    image: Frame | None = None


StepCallback = Callable[[int, ToolResult, float], None]
"""Called once per finished chain step, in order, on the event loop: index, result, seconds the step took."""


class StepInvoker(Protocol):
    """Runs one ProcessRequest against a registered address; the image travels as a serialized Image or a local
    frame (an invoker that gets a frame it does not hold serializes it)."""

    async def process(
        self, address: str, request: tool_service_pb2.ProcessRequest, image: Frame, timeout_s: float
    ) -> ToolResult:
        """Call the tool with `request` plus `image` as its image field; raise ToolCallError on failure."""
        ...  # pragma: no cover

    def keeps_frames(self, address: str) -> bool:
        """True when the tool at `address` runs in this process and intermediate frames can stay decoded."""
        ...  # pragma: no cover


class ToolInvoker(StepInvoker, Protocol):
    """A StepInvoker that also runs chains: consecutive steps of one service in one call."""

    async def process_chain(
        self,
        address: str,
        requests: Sequence[tool_service_pb2.ProcessRequest],
        image: Frame,
        timeout_s: float,
        on_step: StepCallback,
        addresses: Sequence[str] | None = None,
    ) -> ChainOutcome:
        """Run the steps in order on `image`; report each finished step through `on_step`; a step failing is an
        outcome, a failed call (nothing ran) raises ToolCallError. `addresses` (each step's, one per request) is given
        only for a chain across services of one chain group (the embedded tools); otherwise every step is at
        `address`."""
        ...  # pragma: no cover


@dataclass(frozen=True)
class ExecutorLimits:
    """Concurrency bounds and retry backoff ceiling."""

    steps_per_execution: int = 8
    steps_total: int = 64
    executions: int = 64
    executions_per_principal: int = 32
    max_backoff_s: float = 5.0
    raw_intermediate_max_pixels: int = 16_000_000
    lease_s: float = 10.0
    """How long an execution's owner may go silent before another replica marks it interrupted."""


@dataclass
class Carried:
    """An image between steps (a serialized Image never re-parsed, or a local frame) plus the format outputs will be
    encoded in."""

    image: Frame
    output_media_type: str
    output_quality: int = 0
    size: tuple[int, int] = (0, 0)


@dataclass
class StepResult:
    """What a finished step hands downstream."""

    carried: Carried
    detections: list[image_pb2.Detection] = field(default_factory=list)


def input_image(image: image_pb2.Image | InputImage) -> InputImage:
    """An input as the executor holds it (a message is serialized once)."""
    if isinstance(image, InputImage):
        return image
    return InputImage(image.SerializeToString(), image.data, image.media_type, image.width, image.height)


def input_format(image: InputImage) -> tuple[str, tuple[int, int]]:
    """An input's media type and size: as declared, else read from its encoded header (no pixel decoding)."""
    media_type, size = image.media_type, (image.width, image.height)
    if media_type and size[0] and size[1]:
        return media_type, size
    sniffed, header_size = probe(image.data)
    return media_type or sniffed, size if size[0] and size[1] else header_size


@dataclass
class Execution:
    """One running execution."""

    id: str
    compiled: CompiledPipeline
    log: ExecutionLog
    task: asyncio.Task[None] | None = None
    step_events: bool = True
    owner: str = ""
    interrupted: bool = False
    """Stopped by a shutdown, not by a user: it ends FAILED (interrupted), not CANCELLED."""


class Executor:
    """Starts executions in the background; they outlive the RPC that started them."""

    def __init__(
        self, store: Store, hub: EventHub, invoker: ToolInvoker, allowed: ToolAddressCheck, limits: ExecutorLimits
    ) -> None:
        self._store = store
        self._hub = hub
        self._invoker = invoker
        self._allowed = allowed
        self._limits = limits
        self._running: dict[str, Execution] = {}
        self._starting = 0
        self._per_principal: Counter[str] = Counter()
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._global_slots = asyncio.Semaphore(limits.steps_total)
        self.replica = "r_" + uuid.uuid4().hex[:12]
        """This process's id as the owner of the executions it runs (several replicas may share one store)."""

    async def recover(self) -> list[str]:
        """Mark executions whose owner is gone (its lease ran out: a crashed or killed replica, or this process
        before a restart) as FAILED (interrupted), each step terminal. Every replica runs this now and then; a row is
        claimed by one of them."""
        now = datetime.now(UTC)
        recovered = []
        for row in await self._store.claim_expired(self.replica, now, now + timedelta(seconds=self._limits.lease_s)):
            stored = [
                S.ExecutionEvent.FromString(e.payload) for e in await self._store.list_events(row.execution_id, 0)
            ]
            interrupted = self._hub.open(row.execution_id, after_sequence=row.last_sequence)
            finished = S.ExecutionFinished(state=S.EXECUTION_STATE_FAILED, message=INTERRUPTED_MESSAGE)
            try:
                for event in _unfinished_steps(stored):  # every step ends terminal, not RUNNING inside a FAILED run
                    interrupted.record(event, S.EXECUTION_STATE_RUNNING)
                await interrupted.append(
                    S.ExecutionEvent(execution_finished=finished), S.EXECUTION_STATE_FAILED, INTERRUPTED_MESSAGE
                )
            finally:
                self._hub.close(row.execution_id)
            recovered.append(row.execution_id)
        if recovered:
            log.warning("marked %d interrupted executions as FAILED", len(recovered))
        return recovered

    async def keep_leases(self) -> None:
        """Forever: renew the leases of the executions running here, cancel those another replica was asked to
        cancel, and mark the ones whose owner died. Store errors are logged and retried on the next beat."""
        beat = max(0.2, self._limits.lease_s / 3)
        while True:
            await asyncio.sleep(beat)
            try:
                until = datetime.now(UTC) + timedelta(seconds=self._limits.lease_s)
                for execution_id in await self._store.renew_leases(self.replica, until, list(self._running)):
                    if execution_id in self._running:
                        log.info("execution %s: cancelled from another replica", execution_id)
                        await self.cancel(execution_id)
                await self.recover()
            except Exception as error:  # noqa: BLE001 - a store outage must not stop the heartbeat
                log.warning("lease heartbeat failed (%s); retrying", error)

    async def start(
        self,
        compiled: CompiledPipeline,
        inputs: Mapping[str, image_pb2.Image | InputImage],
        *,
        request_id: str = "",
        deadline_s: float | None = None,
        step_events: bool = True,
        created_by: str = "",
    ) -> tuple[str, bool]:
        """Start (or, for a known request_id, attach to) an execution; returns its id and whether it is new.
        Without `step_events` only the started and finished events are stored and streamed. RESOURCE_EXHAUSTED
        when this server, or `created_by`, has as many executions running as its limit allows."""
        if self._draining:
            raise unavailable("SERVER_DRAINING", "this server is shutting down; retry on another replica or shortly")
        if request_id:
            existing = await self._store.find_execution_by_request(request_id)
            if existing is not None:
                return existing.execution_id, False
        if len(self._running) + self._starting >= self._limits.executions:
            raise resource_exhausted(
                "TOO_MANY_EXECUTIONS",
                f"{len(self._running) + self._starting} executions are running or starting; "
                f"the limit is {self._limits.executions}",
            )
        mine = self._per_principal[created_by]
        if created_by and mine >= self._limits.executions_per_principal:
            raise resource_exhausted(
                "TOO_MANY_EXECUTIONS_FOR_CALLER",
                f"{created_by} has {mine} executions running; the limit per caller is "
                f"{self._limits.executions_per_principal} (IMAGEFLOW_MAX_EXECUTIONS_PER_PRINCIPAL)",
            )
        held = {name: input_image(image) for name, image in inputs.items()}
        _check_inputs(compiled, held)
        # both slots are taken before the first await, so concurrent starts cannot overshoot either limit
        self._starting += 1
        self._per_principal[created_by] += 1
        self._idle.clear()
        started = False
        try:
            execution_id, started = await self._start(compiled, held, request_id, deadline_s, step_events, created_by)
            return execution_id, started
        finally:
            self._starting -= 1
            if not started:
                self._release(created_by)
            self._note_idle()

    def _note_idle(self) -> None:
        if not self._running and not self._starting:
            self._idle.set()

    def _release(self, created_by: str) -> None:
        self._per_principal[created_by] -= 1
        if self._per_principal[created_by] <= 0:
            del self._per_principal[created_by]

    async def _start(
        self,
        compiled: CompiledPipeline,
        inputs: Mapping[str, InputImage],
        request_id: str,
        deadline_s: float | None,
        step_events: bool,
        created_by: str,
    ) -> tuple[str, bool]:
        definition = compiled.definition
        row = ExecutionRow(
            execution_id="ex_" + uuid.uuid4().hex,
            request_id=request_id or None,
            pipeline_id=definition.id,
            pipeline_version=definition.version,
            state="PENDING",
            message="",
            created_at=datetime.now(UTC),
            finished_at=None,
            last_sequence=0,
            created_by=created_by,
            owner=self.replica,
            lease_until=datetime.now(UTC) + timedelta(seconds=self._limits.lease_s),
        )
        row, created = await self._store.create_execution(row)
        if not created:
            return row.execution_id, False
        execution = Execution(
            row.execution_id, compiled, self._hub.open(row.execution_id), step_events=step_events, owner=created_by
        )
        self._running[execution.id] = execution
        execution.log.record(
            S.ExecutionEvent(
                execution_started=S.ExecutionStarted(
                    pipeline_id=definition.id, pipeline_version=definition.version, step_ids=list(compiled.order)
                )
            ),
            S.EXECUTION_STATE_RUNNING,
            hold=step_events,  # the first step's started event follows at once: one store write and message for both
        )
        execution.task = asyncio.create_task(
            self._run(execution, dict(inputs), deadline_s), name=f"execution-{execution.id}"
        )
        return execution.id, True

    async def cancel(self, execution_id: str) -> bool:
        """Cancel an execution running here; one running on another replica is flagged for its owner, which cancels
        it on its next heartbeat. False when it is not running anywhere."""
        execution = self._running.get(execution_id)
        if execution is None or execution.task is None:
            return await self._store.request_cancel(execution_id)
        execution.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(execution.task)
        return True

    async def cancel_and_report(self, execution_id: str) -> tuple[ExecutionRow, list[execution_pb2.ExecutionEvent]]:
        """Cancel (here, or through the store on the replica that runs it, waiting up to two heartbeats for it to
        take effect) and return the state."""
        row = await self._row(execution_id)  # NOT_FOUND first, without reading events and outputs
        if execution_id in self._running:
            await self.cancel(execution_id)
            return await self.get(execution_id)
        if not await self.cancel(execution_id):  # not active anywhere: report how it ended
            return await self.get(execution_id)
        deadline = time.monotonic() + 2 * max(0.2, self._limits.lease_s / 3) + 1.0
        while time.monotonic() < deadline:
            row = await self._store.get_execution(execution_id) or row
            if row.state not in ACTIVE_STATES:
                break
            await asyncio.sleep(0.1)
        return await self.get(execution_id)

    async def drain(self, grace_s: float) -> list[str]:
        """Shut down gently: refuse new executions (UNAVAILABLE), give the running ones `grace_s` to finish, then
        stop the rest as FAILED (interrupted), each with its finished event delivered to its watchers. Returns the
        ids of the interrupted ones."""
        self._draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, grace_s))
        interrupted = list(self._running)
        for execution_id in interrupted:
            execution = self._running.get(execution_id)
            if execution is not None:
                execution.interrupted = True
                await self.cancel(execution_id)
        if interrupted:
            log.warning(
                "shutdown: %d executions did not finish within %.1f s; marked FAILED", len(interrupted), grace_s
            )
        return interrupted

    async def shutdown(self) -> None:
        """Stop everything still running at once (FAILED, interrupted)."""
        await self.drain(0.0)

    async def _row(self, execution_id: str) -> ExecutionRow:
        """The stored row, or INVALID_ARGUMENT / NOT_FOUND."""
        if not execution_id:
            raise invalid_argument("EXECUTION_ID_MISSING", "execution_id is required")
        row = await self._store.get_execution(execution_id)
        if row is None:
            raise not_found("EXECUTION_NOT_FOUND", f"execution {execution_id[:80]!r} does not exist")
        return row

    async def get(self, execution_id: str) -> tuple[ExecutionRow, list[execution_pb2.ExecutionEvent]]:
        """The stored row and all events of an execution (output images filled in)."""
        row = await self._row(execution_id)
        events = [S.ExecutionEvent.FromString(e.payload) for e in await self._store.list_events(execution_id, 0)]
        return row, await with_outputs(self._store, events, self._hub.max_result_bytes)

    async def _run(self, execution: Execution, inputs: dict[str, InputImage], deadline_s: float | None) -> None:
        definition = execution.compiled.definition
        attributes: dict[str, str | int] = {
            "imageflow.execution_id": execution.id,
            "imageflow.pipeline_id": definition.id,
            "imageflow.pipeline_version": definition.version,
            "imageflow.steps": len(definition.steps),
        }
        with telemetry.tracer.start_as_current_span("imageflow.execution", attributes=attributes) as span:
            state = await self._run_traced(execution, inputs, deadline_s)
            name = state_name(state)
            span.set_attribute("imageflow.state", name)
            if state != S.EXECUTION_STATE_SUCCEEDED:
                span.set_status(Status(StatusCode.ERROR, name))
            telemetry.executions_finished.add(1, {"state": name})

    async def _run_traced(self, execution: Execution, inputs: dict[str, InputImage], deadline_s: float | None) -> int:
        started = time.monotonic()
        run = _Run(self, execution, inputs, deadline_s)
        try:
            state, message = await run.schedule()
        except asyncio.CancelledError:
            await run.stop_all()
            if execution.interrupted:
                state, message = S.EXECUTION_STATE_FAILED, DRAIN_MESSAGE
            else:
                state, message = S.EXECUTION_STATE_CANCELLED, "cancelled"
        except Exception:
            log.exception("execution %s crashed", execution.id)
            await run.stop_all()
            state, message = S.EXECUTION_STATE_FAILED, "internal error in the executor; see the server log"
        try:
            run.skip_remaining("execution cancelled" if state == S.EXECUTION_STATE_CANCELLED else message)
            event = S.ExecutionEvent()  # built in place: each output image is copied into it once
            finished = event.execution_finished
            finished.state, finished.message = state, message  # type: ignore[assignment]
            run.add_outputs(finished)
            run.results.clear()  # the frames are in the event now
            fit_result(finished, self._hub.max_result_bytes)  # the limit replays apply too: one rule
            state, message = finished.state, finished.message
            finished.duration.FromTimedelta(_elapsed(started))
            await execution.log.append(event, state, message)
        finally:
            if self._running.pop(execution.id, None) is not None:
                self._release(execution.owner)
            self._hub.close(execution.id)
            self._note_idle()
        return state


class ToolAddressCheck(Protocol):
    """Whether an address belongs to the registry (the executor dials nothing else)."""

    def __call__(self, address: str) -> bool:
        """True when registered."""
        ...  # pragma: no cover


def _unfinished_steps(events: list[execution_pb2.ExecutionEvent]) -> list[execution_pb2.ExecutionEvent]:
    """For an interrupted execution: a step_failed for each step that started and never ended, a step_skipped for each
    step that never started."""
    planned: list[str] = []
    started: dict[str, int] = {}
    ended: set[str] = set()
    for event in events:
        kind = event.WhichOneof("kind")
        if kind == "execution_started":
            planned = list(event.execution_started.step_ids)
        elif kind == "step_started":
            started[event.step_started.step_id] = event.step_started.attempt
        elif kind in TERMINAL_STEP_EVENTS:
            ended.add(getattr(event, kind).step_id)
    closing = []
    for step_id in planned:
        if step_id in ended:
            continue
        if step_id in started:
            failed = S.StepFailed(
                step_id=step_id, code="ABORTED", message=INTERRUPTED_MESSAGE, attempts=started[step_id]
            )
            closing.append(S.ExecutionEvent(step_failed=failed))
        else:
            closing.append(S.ExecutionEvent(step_skipped=S.StepSkipped(step_id=step_id, reason=INTERRUPTED_MESSAGE)))
    return closing


def _step_span(
    step: CompiledStep, attempt: int, box: dict[str, Any], seconds: float | None = None, failure: str = ""
) -> None:
    """A chain step as its own span (what a step run alone gets), under the chain's span (`box["span"]`). The steps
    are laid end to end from the chain call's start (`box["cursor"]`), each as long as its service reported; a failed
    step (`seconds` None) lasts until now and carries its status code."""
    if box["span"] is None:  # tracing is off: nothing to record
        return
    start_ns: int = box["cursor"]
    end_ns = time.time_ns() if seconds is None else start_ns + int(seconds * 1e9)
    box["cursor"] = end_ns
    span = telemetry.tracer.start_span(
        "imageflow.step", context=box["span"], attributes=_step_attributes(step, attempt), start_time=start_ns
    )
    if failure:
        span.set_attribute("rpc.grpc.status_code", failure)
        span.set_status(Status(StatusCode.ERROR, failure))
    span.end(end_time=end_ns)


def _step_attributes(step: CompiledStep, attempt: int) -> dict[str, str | int]:
    """What a step's span (and a chain's, for its first step) says about the step."""
    return {"imageflow.step_id": step.id, "imageflow.tool": step.tool.name, "imageflow.attempt": attempt}


def _elapsed(started: float) -> timedelta:
    return timedelta(seconds=time.monotonic() - started)


def _check_inputs(compiled: CompiledPipeline, inputs: Mapping[str, InputImage]) -> None:
    for name in compiled.pipeline_inputs:
        image = inputs.get(name)
        if image is None or not image.data:
            raise invalid_argument("INPUT_MISSING", f"inputs[{name!r}] is required by the pipeline and has no data")
        if image.media_type in RAW_TYPES and (image.width <= 0 or image.height <= 0):
            raise invalid_argument("INPUT_RAW_SIZE", f"inputs[{name!r}] is raw and needs width and height")


class _Run:
    """The mutable state of one execution's scheduling loop."""

    def __init__(
        self, executor: Executor, execution: Execution, inputs: dict[str, InputImage], deadline_s: float | None
    ) -> None:
        self.ex = executor
        self.execution = execution
        self.compiled = execution.compiled
        self.inputs: dict[str, Carried] = {}
        for name, image in inputs.items():
            media_type, size = input_format(image)
            self.inputs[name] = Carried(image.serialized, media_type, 0, size)
        inputs.clear()  # the run's own copy: the frames live on in self.inputs alone, released after their readers
        self.deadline = None if deadline_s is None else time.monotonic() + deadline_s
        self.results: dict[str, StepResult] = {}
        self.detections: dict[str, list[image_pb2.Detection]] = {}
        self.failed: dict[str, str] = {}
        self.skipped: set[str] = set()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.slots = asyncio.Semaphore(executor._limits.steps_per_execution)
        # How many steps still have to read each step's results; at zero a non-output step's image is released.
        self.readers: dict[str, int] = {step_id: 0 for step_id in self.compiled.order}
        self.input_readers: dict[str, int] = dict.fromkeys(self.inputs, 0)  # likewise for the pipeline's inputs
        for step in self.compiled.steps.values():
            for source_step in {src.step for src in step.inputs.values() if src.step is not None}:
                self.readers[source_step] += 1
            for name in _input_names(step):
                self.input_readers[name] = self.input_readers.get(name, 0) + 1
        self.fail_fast = self.compiled.definition.failure_policy != pipeline_pb2.FAILURE_POLICY_CONTINUE

    def record(self, event: execution_pb2.ExecutionEvent) -> None:
        """Log an event without waiting for the store: writes are chained in sequence order and each event is
        published only once stored; the finished event, awaited by the run, waits for all of them."""
        if not self.execution.step_events:
            return
        # after the last step's terminal event comes the finished event: both go in one store write
        last = event.WhichOneof("kind") in TERMINAL_STEP_EVENTS and not self.unfinished(self.compiled.order)
        self.execution.log.record(event, S.EXECUTION_STATE_RUNNING, hold=last)

    async def schedule(self) -> tuple[int, str]:
        graph: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter(
            {step_id: self.compiled.steps[step_id].depends_on for step_id in self.compiled.order}
        )
        graph.prepare()
        done: asyncio.Queue[str] = asyncio.Queue()

        def launch_ready() -> str | None:
            """Start the steps that are ready; the one to run in this task instead, when it is the only step that can
            run (a chain, or a pipeline's next lone step: a task and two turns of the event loop fewer)."""
            ready, runnable = list(graph.get_ready()), []
            while ready:
                step_id = ready.pop(0)
                if step_id in self.skipped or step_id in self.results or step_id in self.failed:
                    # skipped with an upstream step, or already run inside a chain: release its dependents
                    graph.done(step_id)
                    ready.extend(graph.get_ready())
                else:
                    runnable.append(step_id)
            if len(runnable) == 1 and not self.tasks:
                return runnable[0]
            for step_id in runnable:
                self.tasks[step_id] = asyncio.create_task(self.run_step(step_id, done))
            return None

        here = launch_ready()
        while self.tasks or here is not None:
            if here is not None:
                await self.run_step(here, done)  # nothing else can run meanwhile: the graph waits on this step
                here = None
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # a cancel the step swallowed still ends the execution
                    raise asyncio.CancelledError
            finished_id = await done.get()
            self.tasks.pop(finished_id, None)
            members = self.compiled.chains.get(finished_id, (finished_id,))
            if self.fail_fast and any(m in self.failed for m in members):
                await self.stop_all()
                break
            for member in members:
                if member in self.failed or member in self.skipped:
                    for step_id in self.compiled.dependents[member]:
                        self.skip_with_dependents(step_id, f"upstream step {member!r} did not succeed")
            graph.done(finished_id)
            here = launch_ready()
        if self.failed:
            self.skip_remaining(f"step {next(iter(self.failed))!r} failed")
            succeeded_outputs = [o for o in self.compiled.outputs if o in self.results]
            first = next(iter(self.failed.items()))
            message = f"step {first[0]!r} failed: {first[1]}"
            if not self.fail_fast and succeeded_outputs:
                return S.EXECUTION_STATE_PARTIALLY_SUCCEEDED, message
            return S.EXECUTION_STATE_FAILED, message
        return S.EXECUTION_STATE_SUCCEEDED, ""

    def skip_with_dependents(self, step_id: str, reason: str) -> None:
        stack = [step_id]
        while stack:
            current = stack.pop()
            if current in self.skipped or current in self.results or current in self.failed or current in self.tasks:
                continue
            self.skipped.add(current)
            self.record(S.ExecutionEvent(step_skipped=S.StepSkipped(step_id=current, reason=reason)))
            stack.extend(self.compiled.dependents[current])

    async def stop_all(self) -> None:
        tasks = list(self.tasks.items())
        for _, task in tasks:
            task.cancel()
        await asyncio.gather(*(t for _, t in tasks), return_exceptions=True)
        self.tasks.clear()

    def skip_remaining(self, reason: str) -> None:
        for step_id in self.unfinished(self.compiled.order):
            self.skipped.add(step_id)
            self.record(S.ExecutionEvent(step_skipped=S.StepSkipped(step_id=step_id, reason=reason)))

    def add_outputs(self, finished: execution_pb2.ExecutionFinished) -> None:
        """The output steps' images and detections, then the detections of every other step that found some
        (「人物を検出して枠を描いて」 returns the picture and the list)."""
        for step_id in self.compiled.outputs:
            result = self.results.get(step_id)
            if result is not None:
                output = finished.outputs.add(step_id=step_id, detections=result.detections)
                output.image.MergeFromString(serialized(result.carried.image))  # type: ignore[arg-type]  # any buffer
                # the log names each output's blob and says which were left out: nothing a tool sent counts for that
                output.image.ClearField("blob_ref")
                output.image.ClearField("data_bytes")
        for step_id in self.compiled.order:
            if step_id not in self.compiled.outputs and step_id in self.detections:
                finished.outputs.add(step_id=step_id, detections=self.detections[step_id])

    def source_image(self, step: CompiledStep) -> Carried:
        source = step.inputs["image"]
        if source.step is None:
            return self.inputs[source.pipeline_input or "image"]
        return self.results[source.step].carried

    async def run_step(self, step_id: str, done: asyncio.Queue[str]) -> None:
        chain = self.compiled.chains.get(step_id)
        try:
            async with self.slots, self.ex._global_slots:
                if chain is None:
                    await self.attempt_loop(self.compiled.steps[step_id])
                else:
                    await self.attempt_chain([self.compiled.steps[m] for m in chain])
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and not task.cancelling():
                # nobody cancelled this step or its execution: a call under it was (grpc.aio raises CancelledError
                # for a call cancelled on the client side: its channel closed when the tool was removed or
                # re-registered). The step fails; the execution goes on by its failure policy.
                cut = self.unfinished(chain or (step_id,))
                if cut:
                    reason = "CANCELLED: the call to the tool was cancelled under the step (its channel closed)"
                    self.fail(self.compiled.steps[cut[0]], "CANCELLED", reason, 1)
                return
            for member in self.unfinished(chain or (step_id,)):
                self.skipped.add(member)
                self.record(S.ExecutionEvent(step_skipped=S.StepSkipped(step_id=member, reason="cancelled")))
            raise
        except Exception:  # a bug must fail the step, never leave it without a terminal event
            log.exception("step %s crashed in execution %s", step_id, self.execution.id)
            crashed = self.unfinished(chain or (step_id,))
            if crashed:  # the rest of a chain is skipped as its dependents
                reason = "INTERNAL: the step crashed in the control plane; see the server log"
                self.fail(self.compiled.steps[crashed[0]], "INTERNAL", reason, 1)
        finally:
            done.put_nowait(step_id)

    async def attempt_chain(self, steps: list[CompiledStep]) -> None:
        """A run of steps on one tool service in one call per attempt; events stay per step. A retryable failure
        is retried from the failing step, on the output of the last step that succeeded."""
        head = steps[0]
        blocked = next((step for step in steps if not self.ex._allowed(step.tool.address)), None)
        if blocked is not None:  # (a chain across embedded services has several addresses) nothing runs
            reason = f"chain member {blocked.id!r}: tool address {blocked.tool.address} is not registered"
            for ahead in steps[: steps.index(blocked)]:
                self.skipped.add(ahead.id)
                self.record(S.ExecutionEvent(step_skipped=S.StepSkipped(step_id=ahead.id, reason=reason)))
            self.fail_unregistered(blocked)
            return
        carried = dataclasses.replace(self.source_image(head))  # a copy: release_inputs empties the upstream one
        self.release_inputs(head)
        index, attempt, backoff = 0, 1, head.initial_backoff_s
        max_attempts = min(step.max_attempts for step in steps)
        while index < len(steps):
            remaining = steps[index:]
            requests = [self.build_request(step, carried) for step in remaining]
            self.started(remaining[0], attempt)
            timeout = self.time_left(sum(step.timeout_s for step in remaining))
            state: dict[str, Any] = {"carried": carried, "reported": 0}

            def on_step(
                offset: int,
                result: ToolResult,
                seconds: float,
                *,
                base: int = index,
                first_attempt: int = attempt,
                box: dict[str, Any] = state,
            ) -> None:
                step = steps[base + offset]
                box["carried"] = self.carried_after(box["carried"], result)
                box["reported"] = offset + 1
                self.keep_result(step, box["carried"], result)
                _step_span(step, first_attempt if offset == 0 else 1, box, seconds)
                self.succeeded(step, result, seconds)
                if base + offset + 1 < len(steps):
                    self.started(steps[base + offset + 1], 1)

            attributes = {
                **_step_attributes(remaining[0], attempt),
                "imageflow.chain": ",".join(s.id for s in remaining),
            }
            with telemetry.tracer.start_as_current_span("imageflow.chain", attributes=attributes) as span:
                # each step's span is a child of the chain's (none when nothing records spans)
                state["span"] = trace.set_span_in_context(span) if span.is_recording() else None
                state["cursor"] = time.time_ns()
                addresses = [step.tool.address for step in remaining]  # more than one only across a chain group
                across = addresses if len(set(addresses)) > 1 else None
                try:
                    outcome = await self.ex._invoker.process_chain(
                        addresses[0], requests, carried.image, timeout, on_step, across
                    )
                except ToolCallError as call_error:
                    outcome = ChainOutcome(0, call_error)
                if outcome.failure is not None:
                    span.set_status(Status(StatusCode.ERROR, outcome.failure.code))
                    failing = int(state["reported"])
                    if failing < len(remaining):  # the step that failed gets its span too
                        _step_span(
                            remaining[failing], attempt if failing == 0 else 1, state, failure=outcome.failure.code
                        )
            if outcome.failure is None:
                return
            reported = int(state["reported"])  # the steps already recorded as succeeded are what counts
            index += reported
            carried = state["carried"]
            resumable = reported == 0 or (reported == outcome.completed and outcome.image is not None)
            if reported:
                attempt = 1
                if outcome.image is not None and resumable:
                    carried = Carried(outcome.image, carried.output_media_type, carried.output_quality, carried.size)
            if index >= len(steps):  # every step reported done, yet a failure: trust the steps, not the failure
                return
            last_attempt = attempt >= max_attempts
            if not await self.retry_or_fail(steps[index], outcome.failure, attempt, backoff, last_attempt, resumable):
                return
            backoff *= 2
            attempt += 1

    async def retry_or_fail(
        self, step: CompiledStep, error: ToolCallError, attempt: int, backoff: float, last_attempt: bool,
        resumable: bool = True,
    ) -> bool:  # fmt: skip
        """After a failed attempt: wait and say so (True) when the code is retryable and attempts and time are
        left, else record the step as failed (False)."""
        out_of_time = self.deadline is not None and time.monotonic() + backoff >= self.deadline
        if error.retryable and not last_attempt and not out_of_time and resumable:
            wait = min(self.ex._limits.max_backoff_s, backoff) * random.uniform(0.5, 1.0)
            event = S.StepRetrying(step_id=step.id, attempt=attempt, code=error.code, message=error.message)
            event.backoff.CopyFrom(_duration(wait))
            self.record(S.ExecutionEvent(step_retrying=event))
            telemetry.step_retries.add(1, {"tool": step.tool.name, "code": error.code})
            await asyncio.sleep(wait)
            return True
        self.fail(step, error.code, f"{error.code}: {error.message}", attempt, error.message)
        telemetry.step_failures.add(1, {"tool": step.tool.name, "code": error.code})
        return False

    def fail(self, step: CompiledStep, code: str, reason: str, attempts: int, message: str | None = None) -> None:
        """Record a step as failed: `reason` for the execution's message, `message` (default the reason) in the event."""
        self.failed[step.id] = reason
        failed = S.StepFailed(
            step_id=step.id, code=code, message=reason if message is None else message, attempts=attempts
        )
        self.record(S.ExecutionEvent(step_failed=failed))

    def started(self, step: CompiledStep, attempt: int) -> None:
        event = S.ExecutionEvent()  # filled in place: no message built apart and copied in (twice per step)
        body = event.step_started
        body.step_id, body.tool, body.attempt = step.id, step.tool.name, attempt
        self.record(event)

    def time_left(self, timeout_s: float) -> float:
        """A call's timeout, cut to what is left of the execution's deadline."""
        return timeout_s if self.deadline is None else min(timeout_s, max(0.001, self.deadline - time.monotonic()))

    def unfinished(self, members: Sequence[str]) -> list[str]:
        """The steps among `members` with no terminal event yet."""
        return [m for m in members if m not in self.results and m not in self.failed and m not in self.skipped]

    def fail_unregistered(self, step: CompiledStep) -> None:
        self.fail(step, "PERMISSION_DENIED", f"tool address {step.tool.address} is not registered", 0)

    def succeeded(self, step: CompiledStep, response: ToolResult, seconds: float) -> None:
        event = S.ExecutionEvent()
        body = event.step_succeeded
        body.step_id, body.width, body.height = step.id, response.header.width, response.header.height
        body.metadata.CopyFrom(response.metadata)
        if response.detections:
            body.detection_count = len(response.detections)
            body.detections.extend(response.detections)
            self.detections[step.id] = list(response.detections)
        body.duration.FromNanoseconds(int(seconds * 1e9))
        telemetry.step_duration.record(seconds, {"tool": step.tool.name})
        self.record(event)

    async def attempt_loop(self, step: CompiledStep) -> None:
        if not self.ex._allowed(step.tool.address):
            self.fail_unregistered(step)
            return
        source = self.source_image(step)
        image = source.image  # held here: release_inputs may drop the upstream copy
        request = self.build_request(step, source)
        self.release_inputs(step)
        backoff = step.initial_backoff_s
        for attempt in range(1, step.max_attempts + 1):
            self.started(step, attempt)
            timeout = self.time_left(step.timeout_s)
            began = time.monotonic()
            try:
                with telemetry.tracer.start_as_current_span(
                    "imageflow.step", attributes=_step_attributes(step, attempt)
                ) as span:
                    try:
                        response = await self.ex._invoker.process(step.tool.address, request, image, timeout)
                    except ToolCallError as failure:
                        span.set_attribute("rpc.grpc.status_code", failure.code)
                        span.set_status(Status(StatusCode.ERROR, failure.code))
                        raise
            except ToolCallError as error:
                if not await self.retry_or_fail(step, error, attempt, backoff, attempt == step.max_attempts):
                    return
                backoff *= 2
                continue
            self.keep_result(step, self.carried_after(source, response), response)
            self.succeeded(step, response, time.monotonic() - began)
            return

    def build_request(self, step: CompiledStep, source: Carried) -> tool_service_pb2.ProcessRequest:
        is_output = step.id in self.compiled.outputs
        gray = step.id in self.compiled.luma_steps
        between = RAW_GRAY if gray else RAW_ANY
        # the bound is on raw bytes: a gray frame is a third of an RGB one of the same size
        bound = self.ex._limits.raw_intermediate_max_pixels * (3 if gray else 1)
        too_big = source.size[0] * source.size[1] > bound
        if too_big and not self.ex._invoker.keeps_frames(step.tool.address):
            between = LOSSLESS_LARGE  # huge frames travel PNG-compressed: bounded memory, still lossless
        request = tool_service_pb2.ProcessRequest(
            tool=step.tool.name,
            params=step.params_struct,
            output_media_type=source.output_media_type if is_output else between,
            output_quality=source.output_quality if is_output else 0,
            omit_output_image=step.id in self.compiled.unread_images,
        )
        detections = step.inputs.get("detections")
        if detections is not None and detections.step is not None:
            request.detections.extend(self.results[detections.step].detections)
        return request

    def release_inputs(self, step: CompiledStep) -> None:
        """Drop upstream images nobody else will read (outputs are kept), the pipeline's inputs included."""
        for source_step in {src.step for src in step.inputs.values() if src.step is not None}:
            self.readers[source_step] -= 1
            result = self.results.get(source_step)
            if self.readers[source_step] == 0 and result is not None and source_step not in self.compiled.outputs:
                result.carried.image = b""
        for name in _input_names(step):
            self.input_readers[name] -= 1
            if self.input_readers[name] == 0 and name in self.inputs:
                self.inputs[name].image = b""

    def keep_result(self, step: CompiledStep, carried: Carried, response: ToolResult) -> None:
        """Hold a step's result for its readers. The image of a step nobody reads is not held: a tool that predates
        `omit_output_image` sent it all the same."""
        if step.id in self.compiled.unread_images:
            carried = dataclasses.replace(carried, image=b"")
        self.results[step.id] = StepResult(carried, list(response.detections))

    def carried_after(self, source: Carried, response: ToolResult) -> Carried:
        media_type, quality = source.output_media_type, source.output_quality
        metadata = response.metadata.fields
        if "encode_media_type" in metadata:
            media_type = metadata["encode_media_type"].string_value
            quality = int(metadata["encode_quality"].number_value) if "encode_quality" in metadata else 0
        return Carried(response.image, media_type, quality, (response.header.width, response.header.height))


def _input_names(step: CompiledStep) -> set[str]:
    """The pipeline inputs a step reads."""
    return {src.pipeline_input or "image" for src in step.inputs.values() if src.step is None}


TERMINAL_STEP_EVENTS = frozenset({"step_succeeded", "step_failed", "step_skipped"})


def _duration(seconds: float) -> Duration:
    value = Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


__all__ = ["Executor", "ExecutorLimits", "ToolCallError", "ToolInvoker", "state_name"]
