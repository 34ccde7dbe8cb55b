"""One contract, two stores: SQLite and a real PostgreSQL cluster; registry and pipeline versions survive a restart."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from imageflow.common.errors import ErrorKind, ImageflowError
from imageflow.server.adapters.storage import open_store
from imageflow.server.adapters.storage.sqlite import CHECKPOINT_BYTES, INLINE_BYTES, SqliteStore
from imageflow.server.domain.compiler import StepDefaults
from imageflow.server.domain.pipelines import PipelineCatalog
from imageflow.server.domain.registry import Registry
from imageflow.server.domain.store import BlobWrite, EventWrite, ExecutionRow, Store
from imageflow.tools import filters, geometry
from imageflow.tools.servicer import tool_message
from imageflow.v1 import pipeline_pb2, tool_pb2


class FakeDescriber:
    """Stands in for the network only: the manifests are the real tools' own."""

    def __init__(self) -> None:
        self.services = {
            "127.0.0.1:7001": [tool_message(spec) for spec in geometry.TOOLS],
            "127.0.0.1:7002": [tool_message(spec) for spec in filters.TOOLS],
        }

    async def describe(self, address: str) -> list[tool_pb2.Tool]:
        return self.services[address]


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    base: str = request.getfixturevalue("postgres_url")
    return base


@pytest_asyncio.fixture(loop_scope="session")
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await open_store(database_url)
    yield opened
    await opened.close()


def chain(name: str) -> pipeline_pb2.Pipeline:
    definition = pipeline_pb2.Pipeline(name=name)
    step = definition.steps.add(id="small", tool="resize")
    step.params.update({"scale": 0.5})
    definition.steps.add(id="gray", tool="grayscale", depends_on=["small"])
    return definition


async def test_register_save_versions_list_delete_and_restart(database_url: str, store: Store) -> None:
    describer = FakeDescriber()
    registry = Registry(store, describer)
    await registry.load()
    start_version = registry.version
    await registry.register("127.0.0.1:7001")
    await registry.register("127.0.0.1:7002")
    assert {t.name for t in registry.list()} >= {"resize", "grayscale", "blur_regions"}
    assert registry.version == start_version + 2
    with pytest.raises(ImageflowError) as caught:
        await registry.register("127.0.0.1:7002x")
    assert caught.value.kind == ErrorKind.INVALID_ARGUMENT
    describer.services["127.0.0.1:7003"] = describer.services["127.0.0.1:7002"]
    with pytest.raises(ImageflowError) as caught:
        await registry.register("127.0.0.1:7003")
    assert caught.value.kind == ErrorKind.ALREADY_EXISTS

    catalog = PipelineCatalog(store, registry, max_steps=64, defaults=StepDefaults())
    v1 = await catalog.save(chain("first"))
    assert v1.version == 1 and v1.id
    assert list(v1.steps[1].depends_on) == ["small"]
    assert v1.steps[0].params["scale"] == 0.5
    second = chain("second")
    second.id = v1.id
    v2 = await catalog.save(second)
    assert (v2.id, v2.version) == (v1.id, 2)
    assert (await catalog.get(v1.id, 1)).name == "first"
    assert (await catalog.get(v1.id)).name == "second"
    other = await catalog.save(chain("other"))
    ghost = chain("ghost")
    ghost.id = "pl_ghost"
    with pytest.raises(ImageflowError) as caught:
        await catalog.save(ghost)
    assert caught.value.kind == ErrorKind.NOT_FOUND

    page, token = await catalog.list(1, "")
    assert [row.pipeline_id for row in page] == [other.id] and token
    page, token = await catalog.list(1, token)
    assert [(row.pipeline_id, row.version) for row in page] == [(v1.id, 2)] and token == ""
    with pytest.raises(ImageflowError):
        await catalog.list(1, "garbage!")

    # a restart keeps it all
    await store.close()
    reopened = await open_store(database_url)
    try:
        again = Registry(reopened, describer)
        await again.load()
        assert again.version == registry.version
        assert {t.name for t in again.list()} == {t.name for t in registry.list()}
        catalog = PipelineCatalog(reopened, again, max_steps=64, defaults=StepDefaults())
        assert (await catalog.get(v1.id, 2)).steps[0].params["scale"] == 0.5
        assert await catalog.delete(v1.id) == 2
        with pytest.raises(ImageflowError) as caught:
            await catalog.get(v1.id)
        assert caught.value.kind == ErrorKind.NOT_FOUND
        assert await again.remove("blur") == again.version
        with pytest.raises(ImageflowError):
            await again.remove("blur")
    finally:
        await reopened.close()
        store_closed = True
    assert store_closed


async def test_invalid_definitions_never_reach_the_store(store: Store) -> None:
    registry = Registry(store, FakeDescriber())
    await registry.register("127.0.0.1:7001")
    catalog = PipelineCatalog(store, registry, max_steps=64, defaults=StepDefaults())
    before = await store.list_pipelines(1000, None)
    await registry.remove("grayscale") if "grayscale" in {t.name for t in registry.list()} else None
    bad = pipeline_pb2.Pipeline(steps=[pipeline_pb2.Step(id="x", tool="grayscale")])  # grayscale is not registered
    with pytest.raises(ImageflowError) as caught:
        await catalog.save(bad)
    assert caught.value.violations[0].field == "steps[0].tool"
    assert await store.list_pipelines(1000, None) == before


async def test_executions_events_and_request_ids(store: Store) -> None:
    row = ExecutionRow("ex_1", "req-1", "pl_1", 1, "RUNNING", "", datetime.now(UTC), None, 0)
    _, created = await store.create_execution(row)
    assert created
    again, created = await store.create_execution(
        ExecutionRow("ex_2", "req-1", "pl_1", 1, "RUNNING", "", datetime.now(UTC), None, 0)
    )
    assert not created and again.execution_id == "ex_1"
    await store.append_events("ex_1", [EventWrite(1, b"one", "RUNNING", "", None)])
    running = await store.get_execution("ex_1")
    assert running is not None and running.state == "RUNNING" and running.last_sequence == 1
    await store.append_events(
        "ex_1",
        [EventWrite(2, b"two", "RUNNING", "", None), EventWrite(3, b"three", "SUCCEEDED", "", datetime.now(UTC))],
    )
    assert [(e.sequence, e.payload) for e in await store.list_events("ex_1", 1)] == [(2, b"two"), (3, b"three")]
    fetched = await store.get_execution("ex_1")
    assert fetched is not None and fetched.state == "SUCCEEDED" and fetched.last_sequence == 3
    assert fetched.finished_at is not None
    assert await store.list_active_executions() == []


async def test_leases_are_renewed_only_for_executions_still_running_here(store: Store) -> None:
    now = datetime.now(UTC)
    for execution_id in ("ex_here", "ex_lost"):
        lease = now + timedelta(seconds=1)
        await store.create_execution(
            ExecutionRow(execution_id, None, "pl_1", 1, "RUNNING", "", now, None, 0, owner="r1", lease_until=lease)
        )
    await store.request_cancel("ex_lost")
    # r1 still runs ex_here; ex_lost's end could not be stored, so r1 no longer runs it
    assert await store.renew_leases("r1", now + timedelta(seconds=60), ["ex_here"]) == []
    assert await store.renew_leases("r1", now + timedelta(seconds=60), []) == []
    claimed = await store.claim_expired("r2", now + timedelta(seconds=5), now + timedelta(seconds=65))
    assert [row.execution_id for row in claimed] == ["ex_lost"]  # its lease ran out; ex_here's did not


async def test_output_blobs_are_stored_apart_and_expire(store: Store) -> None:
    await store.create_execution(ExecutionRow("ex_b", None, "", 0, "RUNNING", "", datetime.now(UTC), None, 0))
    blob = BlobWrite("ex_b/0/out", "out", "image/png", b"\x89PNG" + bytes(1000))
    await store.append_events("ex_b", [EventWrite(1, b"finished", "SUCCEEDED", "", datetime.now(UTC), (blob,))])
    assert await store.get_blobs(["ex_b/0/out", "nope"]) == {"ex_b/0/out": blob.data}
    assert await store.delete_blobs_before(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert await store.delete_blobs_before(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert await store.get_blobs(["ex_b/0/out"]) == {}


async def test_an_output_blob_is_read_in_slices_only_by_its_own_execution(store: Store) -> None:
    """ReadExecutionOutput's reads: any slice of a blob (compressible or not), the whole length with each, nothing
    for another execution's ref or after the retention."""
    rng = random.Random(7)
    noisy = bytes(rng.getrandbits(8) for _ in range(300_000))
    for ex, data in (("ex_r1", noisy), ("ex_r2", bytes(3_000_000))):  # the second compresses well
        await store.create_execution(ExecutionRow(ex, None, "", 0, "RUNNING", "", datetime.now(UTC), None, 0))
        blob = BlobWrite(f"{ex}/0/out", "out", "image/x-raw-rgb8", data)
        await store.append_events(ex, [EventWrite(1, b"finished", "SUCCEEDED", "", datetime.now(UTC), (blob,))])
        ref = blob.ref
        assert await store.read_blob(ex, ref, 0, 1000) == (len(data), data[:1000])
        assert await store.read_blob(ex, ref, 12_345, 100_000) == (len(data), data[12_345:112_345])
        assert await store.read_blob(ex, ref, len(data) - 10, 1000) == (len(data), data[-10:])
        assert await store.read_blob(ex, ref, len(data), 1000) == (len(data), b"")
        assert await store.read_blob(ex, ref, 0, 0) == (len(data), b"")
    assert await store.read_blob("ex_r1", "ex_r2/0/out", 0, 10) is None  # another execution's output
    assert await store.read_blob("ex_r1", "nope", 0, 10) is None
    await store.delete_blobs_before(datetime.now(UTC) + timedelta(seconds=1))
    assert await store.read_blob("ex_r1", "ex_r1/0/out", 0, 10) is None


async def test_postgres_keeps_output_blobs_uncompressed_for_slices(postgres_url: str) -> None:
    """`substring` on a compressed value decompresses it from the start for every piece; stored EXTERNAL it reads
    only the TOAST chunks of the slice."""
    import asyncpg  # the PostgreSQL store's own driver

    await (await open_store(postgres_url)).close()  # migrated
    conn = await asyncpg.connect(postgres_url)
    try:
        storage = await conn.fetchval(
            "SELECT attstorage FROM pg_attribute WHERE attrelid = 'output_blobs'::regclass AND attname = 'data'"
        )
    finally:
        await conn.close()
    assert storage == b"e"  # a "char"


@pytest.mark.parametrize("size", [100, INLINE_BYTES + 1])
async def test_a_failed_event_write_stores_no_blob(store: Store, size: int) -> None:
    ex = f"ex_f{size}"  # the PostgreSQL database outlives one test
    await store.create_execution(ExecutionRow(ex, None, "", 0, "RUNNING", "", datetime.now(UTC), None, 0))
    await store.append_events(ex, [EventWrite(1, b"one", "RUNNING", "", None)])
    blob = BlobWrite(f"{ex}/0/out", "out", "image/png", b"\x89PNG" + bytes(size))
    with pytest.raises(Exception, match=r"(?i)unique"):  # sequence 1 is taken: the event fails, so must its blob
        await store.append_events(ex, [EventWrite(1, b"again", "SUCCEEDED", "", datetime.now(UTC), (blob,))])
    assert await store.get_blobs([blob.ref]) == {}
    assert [(e.sequence, e.payload) for e in await store.list_events(ex, 0)] == [(1, b"one")]
    row = await store.get_execution(ex)
    assert row is not None and row.state == "RUNNING" and row.last_sequence == 1


@pytest_asyncio.fixture(loop_scope="session")
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(f"sqlite:///{tmp_path}/store.db")
    yield opened
    await opened.close()


def count_hops(store: SqliteStore) -> list[int]:
    """Counts the calls handed to the store's thread."""
    hops = [0]
    submit = store._thread.submit

    def counted(*args: Any, **kwargs: Any) -> Any:
        hops[0] += 1
        return submit(*args, **kwargs)

    store._thread.submit = counted  # type: ignore[method-assign]
    return hops


def running(execution_id: str) -> ExecutionRow:
    return ExecutionRow(execution_id, None, "pl_1", 1, "RUNNING", "", datetime.now(UTC), None, 0)


async def test_sqlite_small_calls_run_on_the_loop_while_the_connection_is_free(sqlite_store: SqliteStore) -> None:
    hops = count_hops(sqlite_store)
    await sqlite_store.create_execution(running("ex_1"))
    await sqlite_store.append_events("ex_1", [EventWrite(1, b"started", "RUNNING", "", None)])
    small = BlobWrite("ex_1/0/out", "out", "image/jpeg", bytes(1000))
    await sqlite_store.append_events("ex_1", [EventWrite(2, b"done", "SUCCEEDED", "", datetime.now(UTC), (small,))])
    row = await sqlite_store.get_execution("ex_1")
    assert row is not None and row.state == "SUCCEEDED" and row.last_sequence == 2
    assert hops == [0]
    # listings, and writes of more than INLINE_BYTES, go to the store's thread
    assert await sqlite_store.get_blobs([small.ref]) == {small.ref: small.data}
    big = BlobWrite("ex_1/1/out", "out", "image/png", bytes(INLINE_BYTES))
    await sqlite_store.append_events("ex_1", [EventWrite(3, b"more", "SUCCEEDED", "", None, (big,))])
    assert hops == [2]


async def test_sqlite_a_small_call_waits_while_the_thread_holds_the_connection(sqlite_store: SqliteStore) -> None:
    await sqlite_store.create_execution(running("ex_1"))
    hops = count_hops(sqlite_store)
    entered, release = threading.Event(), threading.Event()

    def hold(db: Any) -> int:
        entered.set()
        release.wait(10)
        return int(db.execute("SELECT COUNT(*) FROM executions").fetchone()[0])

    held = asyncio.ensure_future(sqlite_store._run(hold))
    assert await asyncio.to_thread(entered.wait, 10)
    create = asyncio.ensure_future(sqlite_store.create_execution(running("ex_2")))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not create.done()  # it did not touch the connection the thread holds
    release.set()
    assert await held == 1  # the second row came after, in its turn on the thread
    await create
    assert await sqlite_store.get_execution("ex_2") is not None
    assert hops == [2]


async def test_sqlite_checkpoints_the_wal_on_its_own_thread(sqlite_store: SqliteStore, tmp_path: Path) -> None:
    # SQLite's own checkpoint would run inside the commit that crossed its line: on the event loop, with fsyncs
    assert await sqlite_store._run(lambda db: db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0
    await sqlite_store.create_execution(running("ex_1"))
    await sqlite_store._run(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
    before = (tmp_path / "store.db").stat().st_size
    chunks = CHECKPOINT_BYTES // (1 << 20) + 1
    for n in range(1, chunks + 1):
        blob = BlobWrite(f"ex_1/{n}/out", "out", "image/png", os.urandom(1 << 20))
        await sqlite_store.append_events("ex_1", [EventWrite(n, b"step", "RUNNING", "", None, (blob,))])
    await sqlite_store._run(lambda db: None)  # after the checkpoint the writes asked for
    # only a checkpoint moves pages from the WAL into the database file
    assert (tmp_path / "store.db").stat().st_size >= before + CHECKPOINT_BYTES


async def test_postgres_down_is_unavailable_and_the_store_recovers() -> None:
    """A real cluster stopped under an open store: clear UNAVAILABLE, never INTERNAL; back when it returns."""
    import asyncio

    from tests.conftest import PostgresCluster

    cluster = PostgresCluster()
    cluster.start()
    store = await open_store(cluster.url)
    try:
        assert await store.get_execution("ex_none") is None
        cluster.stop("fast")  # (fsync and synchronous_commit are off: a crash could lose the migrations themselves)
        for _ in range(2):  # the pooled connection dies, then a new one is refused
            with pytest.raises(ImageflowError) as down:
                await store.get_execution("ex_none")
            assert down.value.kind == ErrorKind.UNAVAILABLE and down.value.reason == "STORE_UNAVAILABLE"
        cluster.start()
        for _ in range(50):
            try:
                assert await store.get_execution("ex_none") is None
                break
            except ImageflowError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the store did not recover after PostgreSQL came back")
    finally:
        await store.close()
        cluster.remove()


async def test_an_execution_rides_out_a_postgres_outage() -> None:
    """PostgreSQL stops while a step runs and returns seconds later: reads meanwhile are UNAVAILABLE, the execution
    finishes, its events are stored once the database is back, its stream ends, and nothing is left RUNNING."""
    import asyncio

    import grpc
    from imageflow.common.serving import start_grpc_server
    from imageflow.server.app import start_control_plane
    from imageflow.server.settings import Settings
    from imageflow.v1 import (
        execution_pb2,
        pipeline_service_pb2,
        pipeline_service_pb2_grpc,
        tool_registry_service_pb2,
        tool_registry_service_pb2_grpc,
        tool_service_pb2_grpc,
    )

    from tests.conftest import PostgresCluster, aio_channel
    from tests.test_executor import ASTRONAUT, MisbehavingTools, build

    cluster = PostgresCluster()
    cluster.start()
    servicer = MisbehavingTools(("sleepy",))
    tools = await start_grpc_server(
        host="127.0.0.1", port=0, max_message_bytes=64 << 20, service_names=["imageflow.v1.ToolService"],
        register=lambda s: tool_service_pb2_grpc.add_ToolServiceServicer_to_server(servicer, s),
    )  # fmt: skip
    plane = await start_control_plane(
        Settings(host="127.0.0.1", port=0, database_url=cluster.url, embedded_tools=False)
    )
    try:
        async with aio_channel(plane.address) as channel:
            registry = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel)
            await registry.RegisterTool(
                tool_registry_service_pb2.RegisterToolRequest(address=f"127.0.0.1:{tools.port}")
            )
            pipelines = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            pipeline = build(
                {"id": "a", "tool": "sleepy", "params": {"sleep_ms": 1500, "key": "pg-a"}},
                {"id": "b", "tool": "sleepy", "params": {"sleep_ms": 1500, "key": "pg-b"}, "after": ["a"]},
            )
            call = pipelines.ExecutePipeline(
                pipeline_service_pb2.ExecutePipelineRequest(pipeline=pipeline, inputs={"image": ASTRONAUT})
            )
            first = await call.read()
            while (await call.read()).event.WhichOneof("kind") != "step_started":
                pass
            await asyncio.to_thread(cluster.stop, "fast")
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await pipelines.GetExecution(
                    pipeline_service_pb2.GetExecutionRequest(execution_id=first.event.execution_id)
                )
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(4)  # both steps finish while the database is away
            await asyncio.to_thread(cluster.start)
            async with asyncio.timeout(60):
                while (reply := await call.read()) is not grpc.aio.EOF:
                    last = reply.event
            assert last.execution_finished.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
            got = await pipelines.GetExecution(
                pipeline_service_pb2.GetExecutionRequest(execution_id=first.event.execution_id)
            )
            assert got.execution.state == execution_pb2.EXECUTION_STATE_SUCCEEDED
            assert got.execution.last_sequence == last.sequence
        assert await plane.store.list_active_executions() == []
    finally:
        await plane.stop(0.5)
        await tools.stop(0.1)
        cluster.remove()


async def test_sqlite_a_file_locked_by_another_connection_never_blocks_the_loop(
    sqlite_store: SqliteStore, tmp_path: Path
) -> None:
    """An operator's `sqlite3` shell holding the write lock: a call that would run on the loop goes to the store's
    thread, which waits for the lock; the loop keeps turning meanwhile."""
    import sqlite3

    await sqlite_store.create_execution(running("ex_1"))
    hops = count_hops(sqlite_store)
    other = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    asyncio.get_running_loop().call_later(0.3, other.rollback)  # runs only if the loop is free
    gaps: list[float] = []

    async def tick() -> None:
        last = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(0.01)
            now = asyncio.get_running_loop().time()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    started = asyncio.get_running_loop().time()
    assert await sqlite_store.request_cancel("ex_1")
    waited = asyncio.get_running_loop().time() - started
    ticker.cancel()
    other.close()
    assert 0.25 < waited < 3  # it waited for the lock (not SQLite's 5 s on the loop, not an error)
    assert hops == [1] and max(gaps) < 0.2


async def test_sqlite_a_large_definition_is_read_on_the_store_thread(sqlite_store: SqliteStore) -> None:
    small = await sqlite_store.save_pipeline("pl_small", "small", "{}", 1, new=True)
    large = await sqlite_store.save_pipeline("pl_large", "large", "x" * (INLINE_BYTES + 1), 1, new=True)
    assert small is not None and large is not None
    hops = count_hops(sqlite_store)
    assert (await sqlite_store.get_pipeline("pl_small", 0)).definition == "{}"  # type: ignore[union-attr]
    assert hops == [0]
    assert (await sqlite_store.get_pipeline("pl_large", 1)).definition == "x" * (INLINE_BYTES + 1)  # type: ignore[union-attr]
    assert hops == [1]
    assert await sqlite_store.get_pipeline("pl_none", 0) is None


async def test_sqlite_a_cancelled_close_still_closes(tmp_path: Path) -> None:
    import sqlite3

    store = await SqliteStore.open(f"sqlite:///{tmp_path}/closing.db")
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await asyncio.to_thread(store._thread.shutdown, True)  # the close was queued on the store's thread: it ran
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        store._db.execute("SELECT 1")
