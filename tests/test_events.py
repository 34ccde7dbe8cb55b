"""The execution event log: events recorded while a write is in flight are stored together, in order, and each is
published only after it is stored."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from imageflow.server.domain.events import JOIN_MAX_BYTES, MAX_BATCH, ExecutionLog, _batch
from imageflow.server.domain.store import EventWrite
from imageflow.v1 import execution_pb2 as S  # noqa: N812 - the executor's own alias
from imageflow.v1 import image_pb2


class GatedStore:
    """Holds each append until released; remembers the sequences of each call."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_next = False

    async def append_events(self, execution_id: str, events: Sequence[EventWrite]) -> None:
        self.calls.append([e.sequence for e in events])
        await self.release.wait()
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("store went away")


class Sink:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def publish_stored(self, execution_id: str, payload: bytes) -> None:
        self.seen.append(S.ExecutionEvent.FromString(payload).sequence)


def started(step: str) -> S.ExecutionEvent:
    return S.ExecutionEvent(step_started=S.StepStarted(step_id=step, tool="flip", attempt=1))


async def test_events_recorded_during_a_write_are_stored_as_one_group() -> None:
    store, sink = GatedStore(), Sink()
    log = ExecutionLog("ex_1", store, [sink])  # type: ignore[arg-type]
    first = log.record(started("a"), S.EXECUTION_STATE_RUNNING)
    while not store.calls:  # the writer takes event 1 and waits on the store
        await asyncio.sleep(0)
    second = log.record(started("b"), S.EXECUTION_STATE_RUNNING)
    last = log.record(S.ExecutionEvent(execution_finished=S.ExecutionFinished()), S.EXECUTION_STATE_SUCCEEDED)
    assert sink.seen == [] and not first.done()  # nothing is published before it is stored
    store.release.set()
    assert (await last).sequence == 3
    assert store.calls == [[1], [2, 3]]
    assert sink.seen == [1, 2, 3] and first.done() and second.done()
    assert [[e.sequence for e in batch] async for batch in log.follow(0)] == [[1, 2, 3]]


async def test_a_failed_group_fails_its_waiters_and_later_events_still_go() -> None:
    store = GatedStore()
    store.fail_next = True
    log = ExecutionLog("ex_2", store, [])  # type: ignore[arg-type]
    first = log.record(started("a"), S.EXECUTION_STATE_RUNNING)
    store.release.set()
    with pytest.raises(ConnectionError):
        await first
    assert (await log.record(started("b"), S.EXECUTION_STATE_RUNNING)).sequence == 2
    assert store.calls == [[1], [2]]


async def test_a_failed_write_nobody_waits_for_is_logged_once_and_warns_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A step records its events without waiting for them: a write that fails is logged by the log itself, once, and
    the dropped future does not make asyncio report an exception that was never retrieved."""
    import gc

    store = GatedStore()
    store.fail_next = True
    log = ExecutionLog("ex_9", store, [])  # type: ignore[arg-type]
    reported: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        with caplog.at_level("ERROR", logger="imageflow.server.domain.events"):
            log.record(started("a"), S.EXECUTION_STATE_RUNNING)  # dropped, as a step does
            while not store.calls:  # its write is in flight
                await asyncio.sleep(0)
            second = log.record(started("b"), S.EXECUTION_STATE_RUNNING)
            store.release.set()
            await second  # the next write goes through
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    failures = [r for r in caplog.records if "storing events 1-1 of execution ex_9 failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert reported == []


async def test_a_watcher_past_the_end_returns_when_the_execution_finishes() -> None:
    store = GatedStore()
    store.release.set()
    log = ExecutionLog("ex_3", store, [])  # type: ignore[arg-type]
    await log.append(started("a"), S.EXECUTION_STATE_RUNNING)

    async def watch_from(after: int) -> list[int]:
        return [event.sequence async for batch in log.follow(after) for event in batch]

    past_the_end = asyncio.create_task(watch_from(10))
    await asyncio.sleep(0.01)
    assert not past_the_end.done()
    await log.append(S.ExecutionEvent(execution_finished=S.ExecutionFinished()), S.EXECUTION_STATE_SUCCEEDED)
    assert await asyncio.wait_for(past_the_end, 2) == []


async def test_a_watcher_takes_what_is_stored_in_one_batch_and_never_waits_for_more() -> None:
    store = GatedStore()
    store.release.set()
    log = ExecutionLog("ex_4", store, [])  # type: ignore[arg-type]
    await log.append(started("a"), S.EXECUTION_STATE_RUNNING)
    batches = log.follow(0)
    assert [e.sequence for e in await anext(batches)] == [1]  # what is there now, without waiting for more
    waiting = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # nothing new: the watcher waits
    log.record(started("b"), S.EXECUTION_STATE_RUNNING)
    log.record(started("c"), S.EXECUTION_STATE_RUNNING)
    await log.append(S.ExecutionEvent(execution_finished=S.ExecutionFinished()), S.EXECUTION_STATE_SUCCEEDED)
    first = [e.sequence for e in await asyncio.wait_for(waiting, 2)]
    rest = [e.sequence async for batch in batches for e in batch]
    assert first + rest == [2, 3, 4] and first[0] == 2  # in order, none lost or repeated
    assert len(first) > 1  # the events stored together (one group while the first write was in flight) came together


async def test_a_long_backlog_comes_in_batches_of_at_most_max_batch() -> None:
    store = GatedStore()
    store.release.set()
    log = ExecutionLog("ex_5", store, [])  # type: ignore[arg-type]
    for index in range(MAX_BATCH + 10):
        log.record(started(f"s{index}"), S.EXECUTION_STATE_RUNNING)
    await log.append(S.ExecutionEvent(execution_finished=S.ExecutionFinished()), S.EXECUTION_STATE_SUCCEEDED)
    sizes = [len(batch) async for batch in log.follow(0)]
    assert sizes[0] == MAX_BATCH and sum(sizes) == MAX_BATCH + 11


async def test_events_recorded_in_the_same_turn_of_the_loop_share_a_write() -> None:
    store = GatedStore()
    store.release.set()
    log = ExecutionLog("ex_6", store, [])  # type: ignore[arg-type]
    log.record(started("a"), S.EXECUTION_STATE_RUNNING)
    await asyncio.sleep(0)  # the next turn: the writer has not taken anything yet
    log.record(started("b"), S.EXECUTION_STATE_RUNNING)
    await log.append(S.ExecutionEvent(execution_finished=S.ExecutionFinished()), S.EXECUTION_STATE_SUCCEEDED)
    assert store.calls == [[1, 2, 3]]


async def test_a_held_event_waits_for_the_next_one_or_a_short_while() -> None:
    store = GatedStore()
    store.release.set()
    log = ExecutionLog("ex_7", store, [])  # type: ignore[arg-type]
    held = log.record(started("a"), S.EXECUTION_STATE_RUNNING, hold=True)
    for _ in range(5):
        await asyncio.sleep(0)
    assert store.calls == [] and not held.done()  # no write of its own
    await log.append(started("b"), S.EXECUTION_STATE_RUNNING)
    assert store.calls == [[1, 2]] and held.done()  # the next event's write took it
    alone = log.record(started("c"), S.EXECUTION_STATE_RUNNING, hold=True)
    assert (await asyncio.wait_for(alone, 2)).sequence == 3  # nothing followed: written after HOLD_MAX_S
    assert store.calls == [[1, 2], [3]]


async def test_a_held_event_is_not_taken_by_a_write_already_in_flight() -> None:
    store = GatedStore()
    log = ExecutionLog("ex_8", store, [])  # type: ignore[arg-type]
    log.record(started("a"), S.EXECUTION_STATE_RUNNING)
    while not store.calls:  # event 1's write is in flight
        await asyncio.sleep(0)
    held = log.record(started("b"), S.EXECUTION_STATE_RUNNING, hold=True)
    store.release.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert store.calls == [[1]] and not held.done()  # the writer, done with 1, left the held event alone
    await log.append(S.ExecutionEvent(execution_finished=S.ExecutionFinished()), S.EXECUTION_STATE_SUCCEEDED)
    assert store.calls == [[1], [2, 3]] and held.done()  # it went with the event it was held for


async def test_a_finished_event_joins_the_batch_unless_its_outputs_are_large() -> None:
    store = GatedStore()
    store.release.set()

    async def batches_for(size: int) -> list[list[int]]:
        log = ExecutionLog(f"ex_size_{size}", store, [])  # type: ignore[arg-type]
        log.record(started("a"), S.EXECUTION_STATE_RUNNING)
        output = S.StepOutput(step_id="a", image=image_pb2.Image(data=b"x" * size, media_type="image/png"))
        finished = S.ExecutionFinished(state=S.EXECUTION_STATE_SUCCEEDED, outputs=[output])
        await log.append(S.ExecutionEvent(execution_finished=finished), S.EXECUTION_STATE_SUCCEEDED)
        return [[e.sequence for e in batch] async for batch in log.follow(0)]

    assert await batches_for(1000) == [[1, 2]]  # a small picture: one message at the end
    assert await batches_for(JOIN_MAX_BYTES + 1) == [[1], [2]]  # a large one travels alone
    # read back from the store, an output is a reference whose bytes are filled in after the batch is cut: alone
    stored = S.StepOutput(step_id="a", image=image_pb2.Image(blob_ref="ex/0/a", media_type="image/png"))
    finished = S.ExecutionEvent(execution_finished=S.ExecutionFinished(outputs=[stored]))
    assert [len(b) for b in _batches([started("a"), started("b"), finished])] == [2, 1]


def test_a_batch_holds_at_most_join_max_bytes_unless_one_event_is_larger() -> None:
    """Many detections make large step events (a third-party tool's are unbounded): batches are cut by bytes, so no
    stream message carries more than the largest single event or JOIN_MAX_BYTES."""
    box = image_pb2.Detection(label="x" * 1000)

    def succeeded(step_id: str, count: int) -> S.ExecutionEvent:
        return S.ExecutionEvent(step_succeeded=S.StepSucceeded(step_id=step_id, detections=[box] * count))

    count = int(JOIN_MAX_BYTES * 0.28) // box.ByteSize()  # each such event a little over a quarter of the limit
    events = [succeeded(f"s{i}", count) for i in range(7)] + [succeeded("big", 6 * count)]
    events.append(S.ExecutionEvent(execution_finished=S.ExecutionFinished(state=S.EXECUTION_STATE_SUCCEEDED)))
    batches = _batches(events)
    assert [len(b) for b in batches] == [3, 3, 1, 1, 1]  # three fit, not four; the large one alone
    assert all(sum(e.ByteSize() for e in b) <= JOIN_MAX_BYTES for b in batches if len(b) > 1)


def _batches(events: list[S.ExecutionEvent]) -> list[list[S.ExecutionEvent]]:
    out = []
    while events:
        batch = _batch(events)
        out.append(batch)
        events = events[len(batch) :]
    return out


async def test_a_later_hold_is_not_released_by_an_earlier_holds_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    from imageflow.server.domain import events

    monkeypatch.setattr(events, "HOLD_MAX_S", 0.5)
    store = GatedStore()
    store.release.set()
    log = ExecutionLog("ex_9", store, [])  # type: ignore[arg-type]
    log.record(started("a"), S.EXECUTION_STATE_RUNNING, hold=True)
    await asyncio.sleep(0.3)
    log.record(started("b"), S.EXECUTION_STATE_RUNNING, hold=True)  # supersedes the first hold
    await asyncio.sleep(0.3)  # the first hold's timer would have fired at 0.5 s
    assert store.calls == []
    await log.append(S.ExecutionEvent(execution_finished=S.ExecutionFinished()), S.EXECUTION_STATE_SUCCEEDED)
    assert store.calls == [[1, 2, 3]]



async def test_a_watcher_stops_with_an_error_when_the_finished_event_cannot_be_stored() -> None:
    from imageflow.common.errors import ErrorKind, ImageflowError

    store = GatedStore()
    store.release.set()
    log = ExecutionLog("ex_10", store, [])  # type: ignore[arg-type]
    await log.append(started("a"), S.EXECUTION_STATE_RUNNING)
    seen: list[int] = []

    async def watch() -> None:
        async for batch in log.follow(0):
            seen.extend(e.sequence for e in batch)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.01)
    store.fail_next = True  # the store refuses the last write (not an outage: no retry)
    with pytest.raises(ConnectionError):
        await log.append(S.ExecutionEvent(execution_finished=S.ExecutionFinished()), S.EXECUTION_STATE_SUCCEEDED)
    with pytest.raises(ImageflowError) as stopped:
        await asyncio.wait_for(watcher, 2)  # it does not wait forever
    assert stopped.value.kind == ErrorKind.UNAVAILABLE and "ex_10" in stopped.value.message
    assert seen == [1]
