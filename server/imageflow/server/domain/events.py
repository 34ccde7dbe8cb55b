"""Execution event logs: stored before they are sent, fanned out to live watchers and optional sinks (Kafka)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Protocol

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from imageflow.common.errors import ErrorKind, ImageflowError, invalid_argument, not_found, unavailable
from imageflow.common.states import TERMINAL_STATES
from imageflow.server.domain.outputs import DEFAULT_MAX_RESULT_BYTES, OUTPUT_PIECE_BYTES, fill_outputs, read_output
from imageflow.server.domain.store import ACTIVE_STATES, BlobWrite, EventWrite, Store
from imageflow.v1 import execution_pb2

log = logging.getLogger(__name__)
STORE_RETRY_FIRST_S = 0.1
STORE_RETRY_MAX_S = 2.0
REMOTE_POLL_S = 0.2
"""How often a watcher of an execution running on another replica reads its new events from the store."""
MAX_BATCH = 256
"""The most events one batch of `EventHub.watch_batches` holds (a replay of a long execution goes in several)."""
JOIN_MAX_BYTES = 1024 * 1024
"""A batch of events holds no more bytes than this, unless it is one event larger than this alone."""
HOLD_MAX_S = 0.05
"""The longest an event recorded with `hold` waits for the event it is held for."""


class EventSink(Protocol):
    """Somewhere events are also published; must never block or fail an execution."""

    def publish_stored(self, execution_id: str, payload: bytes) -> None:
        """Hand over one event as stored (a serialized ExecutionEvent whose outputs are references; non-blocking)."""
        ...  # pragma: no cover


def state_name(state: int) -> str:
    """`EXECUTION_STATE_RUNNING` -> `RUNNING`."""
    return execution_pb2.ExecutionState.Name(state).removeprefix("EXECUTION_STATE_")  # type: ignore[arg-type]


class ExecutionLog:
    """The live event log of one execution run by this server."""

    def __init__(self, execution_id: str, store: Store, sinks: list[EventSink], after_sequence: int = 0) -> None:
        self.execution_id = execution_id
        self._store = store
        self._sinks = sinks
        self._events: list[execution_pb2.ExecutionEvent] = []
        self._changed = asyncio.Condition()
        self._numbered = after_sequence
        self._pending: list[
            tuple[execution_pb2.ExecutionEvent, EventWrite, asyncio.Future[execution_pb2.ExecutionEvent]]
        ] = []
        self._writer: asyncio.Task[None] | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        """Set while the newest pending event is held (see `record`)."""
        self._broken: Exception | None = None
        self._closed = False
        self.finished = False

    def record(
        self, event: execution_pb2.ExecutionEvent, state: int, message: str = "", *, hold: bool = False
    ) -> asyncio.Future[execution_pb2.ExecutionEvent]:
        """Number and timestamp the event now; store it (in sequence order), then publish it.

        Returns a future that resolves once the event is stored and published (a failed write is logged here, so
        callers that need not wait, a step about to call its tool, let the write overlap their work and drop it).
        Events recorded while a write is in flight are stored together by the next one (one store round trip for the
        group); order and "stored before sent" hold.
        `hold` (an event another follows at once: the started event before the first step's, the last step's before
        the finished one) starts no write of its own: the next event's write takes it, or a write starts after
        HOLD_MAX_S if none comes.
        """
        if self._closed:
            raise RuntimeError("execution already finished")
        self._numbered += 1
        event.execution_id = self.execution_id
        event.sequence = self._numbered
        now_ns = time.time_ns()
        event.time.FromNanoseconds(now_ns)
        terminal = state in TERMINAL_STATES
        self._closed = terminal
        finished_at = datetime.fromtimestamp(now_ns / 1e9, UTC) if terminal else None
        payload, blobs = _apart(event)
        write = EventWrite(event.sequence, payload, state_name(state), message, finished_at, blobs)
        done: asyncio.Future[execution_pb2.ExecutionEvent] = asyncio.get_running_loop().create_future()
        self._pending.append((event, write, done))
        if self._hold_timer is not None:  # an earlier hold ends with this event (its write takes the held one)
            self._hold_timer.cancel()
            self._hold_timer = None
        if hold:  # only ever the newest pending event is held
            self._hold_timer = asyncio.get_running_loop().call_later(HOLD_MAX_S, self._release_hold)
        else:
            self._start_writer()
        return done

    def _release_hold(self) -> None:
        self._hold_timer = None
        self._start_writer()

    def _start_writer(self) -> None:
        if self._pending and (self._writer is None or self._writer.done()):
            self._writer = asyncio.ensure_future(self._write_pending())

    async def append(
        self, event: execution_pb2.ExecutionEvent, state: int, message: str = ""
    ) -> execution_pb2.ExecutionEvent:
        """Record and wait until stored and published."""
        return await self.record(event, state, message)

    async def _write_pending(self) -> None:
        if not self._closed:  # one more turn of the loop: events recorded right after this one join its group
            await asyncio.sleep(0)
        while (ready := len(self._pending) - (0 if self._hold_timer is None else 1)) > 0:  # a held one waits, even here
            group, self._pending = self._pending[:ready], self._pending[ready:]
            try:
                await self._store_riding_out_outages([write for _, write, _ in group])
            except Exception as error:  # logged; each waiter gets the failure; later events still go
                log.error(
                    "storing events %d-%d of execution %s failed",
                    group[0][1].sequence, group[-1][1].sequence, self.execution_id, exc_info=error,
                )  # fmt: skip
                for _, _, done in group:
                    if not done.done():
                        done.set_exception(error)
                        done.exception()  # logged here: a caller that does not wait for it is not warned again
                if any(write.finished_at is not None for _, write, _ in group):
                    self._broken = error  # the end is lost: live watchers stop with an error instead of waiting
                    async with self._changed:
                        self._changed.notify_all()
                continue
            for event, write, done in group:
                self._events.append(event)  # watchers get the outputs inline
                self.finished = write.finished_at is not None or self.finished
                for sink in self._sinks:
                    try:
                        sink.publish_stored(event.execution_id, write.payload)  # what the store holds: no pixels
                    except Exception:
                        log.exception("event sink failed")
                if not done.done():
                    done.set_result(event)
            async with self._changed:
                self._changed.notify_all()

    async def _store_riding_out_outages(self, writes: list[EventWrite]) -> None:
        """Store a group; while the store is unavailable (a database restarting), keep trying with backoff: the
        execution carries on, its events wait in order (stored before sent), and once the store is back they are
        stored and delivered, so no execution is left RUNNING and no stream stops short. Other errors are raised."""
        backoff, warned = STORE_RETRY_FIRST_S, False
        while True:
            try:
                await self._store.append_events(self.execution_id, writes)
            except ImageflowError as error:
                if error.kind != ErrorKind.UNAVAILABLE:
                    raise
                if not warned:
                    log.warning(
                        "execution %s: the store is unavailable; its events wait until it is back", self.execution_id
                    )
                    warned = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, STORE_RETRY_MAX_S)
                continue
            if warned:
                log.info("execution %s: the store is back; %d waiting events stored", self.execution_id, len(writes))
            return

    async def follow(self, after_sequence: int) -> AsyncIterator[list[execution_pb2.ExecutionEvent]]:
        """Events after `after_sequence`, live, until the finished event: each time, every event stored since the
        last batch (at most MAX_BATCH); a batch never waits for more events to arrive."""
        position = after_sequence
        while True:
            if position < len(self._events):
                batch = _batch(self._events[position : position + MAX_BATCH])
                position += len(batch)
                yield batch
                continue
            if self.finished:
                return
            if self._broken is not None:
                raise unavailable(
                    "EVENTS_NOT_STORED",
                    f"execution {self.execution_id}: the store refused its last events "
                    f"({type(self._broken).__name__}); see the server log",
                )
            async with self._changed:  # a watcher past the end wakes when the execution finishes
                await self._changed.wait_for(lambda seen=position: self._moved(seen))  # type: ignore[misc]

    def _moved(self, seen: int) -> bool:
        """Something for a watcher that has seen `seen` events: more events, the end, or an end that was lost."""
        return seen < len(self._events) or self.finished or self._broken is not None


def _batch(events: list[execution_pb2.ExecutionEvent]) -> list[execution_pb2.ExecutionEvent]:
    """The first batch of `events`: up to the finished event, and no more than JOIN_MAX_BYTES in all unless one event
    alone is larger (output images, a tool's many detections: each such event gets a message of its own). A finished
    event with stored images (read from the store, their bytes filled in after batching) also travels alone."""
    total = 0
    for index, event in enumerate(events):
        finished = event.WhichOneof("kind") == "execution_finished"
        alone = finished and _travels_alone(event.execution_finished)
        if not alone:  # upb measures by encoding: cheap for events without large images
            total += event.ByteSize()
        if index and (alone or total > JOIN_MAX_BYTES):
            return events[:index]
        if finished:
            return events[: index + 1]
    return events


def _travels_alone(finished: execution_pb2.ExecutionFinished) -> bool:
    """Output images over JOIN_MAX_BYTES, or stored ones (read from the store, their bytes filled in after
    batching): the finished event gets a message of its own, measured without encoding its images."""
    images = [output.image for output in finished.outputs]
    stored = any(image.blob_ref and not image.data for image in images)
    return stored or sum(len(image.data) for image in images) > JOIN_MAX_BYTES


def _apart(event: execution_pb2.ExecutionEvent) -> tuple[bytes, tuple[BlobWrite, ...]]:
    """The event as stored (serialized) and its output images as blobs: each image gets a `blob_ref`, and the stored
    form carries the ref and the length (`data_bytes`) instead of the bytes. The event itself keeps its bytes (live
    watchers get them inline), but for images `fit_result` left out, which lose them here once they are blobs: the
    stored form is a message of its own with everything but the images' data, so the pixels are read out once and
    never copied back."""
    if event.WhichOneof("kind") != "execution_finished":
        return event.SerializeToString(), ()
    finished = event.execution_finished
    blobs: list[BlobWrite] = []
    sizes: list[int] = []
    for index, output in enumerate(finished.outputs):
        data = output.image.data  # a copy (upb): read once
        sizes.append(len(data))
        if data:
            output.image.blob_ref = f"{event.execution_id}/{index}/{output.step_id}"[:200]
            blobs.append(BlobWrite(output.image.blob_ref, output.step_id, output.image.media_type, data))
    if not blobs:
        return event.SerializeToString(), ()
    stored = execution_pb2.ExecutionEvent()
    _copy_fields(event, stored, skip="execution_finished")
    _copy_fields(finished, stored.execution_finished, skip="outputs")
    for output, size in zip(finished.outputs, sizes, strict=True):
        kept = stored.execution_finished.outputs.add()
        _copy_fields(output, kept, skip="image")
        _copy_fields(output.image, kept.image, skip="data")
        if size:
            kept.image.data_bytes = size
        if output.image.data_bytes:  # left out of messages (fit_result): stored, and sent without its bytes
            output.image.ClearField("data")
    return stored.SerializeToString(), tuple(blobs)


def _copy_fields(source: Message, target: Message, skip: str) -> None:
    """Copy every set field of `source` but `skip` into `target` (the same message type)."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        if descriptor.is_repeated:  # maps too
            getattr(target, descriptor.name).MergeFrom(value)
        elif descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


async def with_outputs(
    store: Store, events: list[execution_pb2.ExecutionEvent], limit: int
) -> list[execution_pb2.ExecutionEvent]:
    """Stored events with their output images' bytes filled back in from the blobs (while retained), as many as fit
    a message of `limit` bytes (the others keep `data_bytes`: see outputs.fill_outputs)."""
    for event in events:
        if event.WhichOneof("kind") == "execution_finished":
            await fill_outputs(store, event.execution_id, event.execution_finished, limit)
    return events


class EventHub:
    """Live logs by execution id, with replay from the store for everything else."""

    def __init__(self, store: Store, sinks: list[EventSink], max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES) -> None:
        self._store = store
        self._sinks = sinks
        self.max_result_bytes = max_result_bytes
        """The largest finished event a message carries: the executor leaves images out of the live event past it,
        and replays by the same limit (the one place it is set)."""
        self._live: dict[str, ExecutionLog] = {}

    def open(self, execution_id: str, after_sequence: int = 0) -> ExecutionLog:
        """A live log whose next event gets sequence `after_sequence + 1`."""
        live = ExecutionLog(execution_id, self._store, self._sinks, after_sequence)
        self._live[execution_id] = live
        return live

    def read_output(self, execution_id: str, blob_ref: str, offset: int) -> AsyncIterator[tuple[int, bytes]]:
        """An output's bytes in pieces, each with its whole length (see outputs.read_output for the errors); a piece
        leaves a message's slack free under the server's message limit."""
        return read_output(self._store, execution_id, blob_ref, offset, min(OUTPUT_PIECE_BYTES, self.max_result_bytes))

    def close(self, execution_id: str) -> None:
        """Forget a finished live log (its events stay in the store)."""
        self._live.pop(execution_id, None)

    async def watch(self, execution_id: str, after_sequence: int) -> AsyncIterator[execution_pb2.ExecutionEvent]:
        """Stored events after `after_sequence`, then live ones until the execution finishes."""
        async for batch in self.watch_batches(execution_id, after_sequence):
            for event in batch:
                yield event

    async def watch_batches(
        self, execution_id: str, after_sequence: int
    ) -> AsyncIterator[list[execution_pb2.ExecutionEvent]]:
        """What `watch` yields, in groups: each group is every event available when the consumer asks for more (at
        most MAX_BATCH), so a consumer that is slower than the execution (a stream write in flight) takes several
        events in one go, and none waits for a group to fill."""
        if not execution_id:
            raise invalid_argument("EXECUTION_ID_MISSING", "execution_id is required")
        if after_sequence < 0:
            raise invalid_argument("SEQUENCE_INVALID", "after_sequence must not be negative")
        live = self._live.get(execution_id)
        if live is not None:
            async for batch in live.follow(after_sequence):
                yield batch
            return
        row = await self._store.get_execution(execution_id)
        if row is None:
            raise not_found("EXECUTION_NOT_FOUND", f"execution {execution_id[:80]!r} does not exist")
        last = after_sequence
        active = row.state in ACTIVE_STATES
        while True:
            stored = await self._store.list_events(execution_id, last)
            start = 0
            while start < len(stored):
                group = _batch(
                    [execution_pb2.ExecutionEvent.FromString(s.payload) for s in stored[start : start + MAX_BATCH]]
                )
                start += len(group)
                last = group[-1].sequence
                if group[-1].WhichOneof("kind") == "execution_finished":
                    yield await with_outputs(self._store, group, self.max_result_bytes)
                    return
                yield group
            live = self._live.get(execution_id)  # it may have started running here after we looked
            if live is not None:
                async for batch in live.follow(last):
                    yield batch
                return
            if not active:  # finished, and everything after `after_sequence` replayed (maybe nothing)
                return
            # running on another replica: follow its events through the shared store
            await asyncio.sleep(REMOTE_POLL_S)
            current = await self._store.get_execution(execution_id)
            active = current is not None and current.state in ACTIVE_STATES
