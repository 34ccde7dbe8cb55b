"""Embedded SQLite store, the default."""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from imageflow.server.domain.store import ACTIVE_STATES, EventRow, EventWrite, ExecutionRow, PipelineRow, ToolRow

T = TypeVar("T")

MIGRATIONS: list[list[str]] = [
    [
        "CREATE TABLE registry_meta (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)",
        "INSERT INTO registry_meta (id, version) VALUES (1, 0)",
        "CREATE TABLE tools (name TEXT PRIMARY KEY, address TEXT NOT NULL, manifest BLOB NOT NULL, updated_at TEXT NOT NULL)",
        """CREATE TABLE pipelines (pipeline_id TEXT NOT NULL, version INTEGER NOT NULL, name TEXT NOT NULL,
           definition TEXT NOT NULL, step_count INTEGER NOT NULL, created_at TEXT NOT NULL,
           PRIMARY KEY (pipeline_id, version))""",
        """CREATE TABLE executions (execution_id TEXT PRIMARY KEY, request_id TEXT UNIQUE, pipeline_id TEXT NOT NULL,
           pipeline_version INTEGER NOT NULL, state TEXT NOT NULL, message TEXT NOT NULL, created_at TEXT NOT NULL,
           finished_at TEXT, last_sequence INTEGER NOT NULL)""",
        "CREATE INDEX executions_state ON executions (state)",
        """CREATE TABLE execution_events (execution_id TEXT NOT NULL REFERENCES executions (execution_id),
           sequence INTEGER NOT NULL, payload BLOB NOT NULL, state TEXT NOT NULL, message TEXT NOT NULL,
           finished_at TEXT, PRIMARY KEY (execution_id, sequence))""",
        # One INSERT per event keeps the execution row current (one statement, one commit, one thread hop).
        """CREATE TRIGGER execution_events_state AFTER INSERT ON execution_events BEGIN
           UPDATE executions SET state = NEW.state, message = NEW.message, finished_at = NEW.finished_at,
           last_sequence = NEW.sequence WHERE execution_id = NEW.execution_id; END""",
    ],
    [
        "ALTER TABLE pipelines ADD COLUMN created_by TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE executions ADD COLUMN created_by TEXT NOT NULL DEFAULT ''",
    ],
    [
        """CREATE TABLE tool_revisions (name TEXT NOT NULL, revision INTEGER NOT NULL, address TEXT NOT NULL,
           manifest BLOB NOT NULL, registered_at TEXT NOT NULL, PRIMARY KEY (name, revision))""",
    ],
    [
        """CREATE TABLE output_blobs (ref TEXT PRIMARY KEY, execution_id TEXT NOT NULL, step_id TEXT NOT NULL,
           media_type TEXT NOT NULL, data BLOB NOT NULL, created_at TEXT NOT NULL)""",
        "CREATE INDEX output_blobs_created ON output_blobs (created_at)",
    ],
    [
        "ALTER TABLE executions ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE executions ADD COLUMN lease_until TEXT",
        "ALTER TABLE executions ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
    ],
]


def _busy(error: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY: another connection holds the lock; nothing was applied."""
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY


def _transaction(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """`work` as one transaction: all of it or none of it."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # SQLite may have rolled it back itself (a full disk): keep the first error
            db.execute("ROLLBACK")
        raise
    return result


def _apply(db: sqlite3.Connection, statements: list[str], number: int) -> None:
    """One migration's statements, then the schema version they bring."""
    for statement in statements:
        db.execute(statement)
    db.execute(f"PRAGMA user_version = {number}")


def _none(_: object) -> None:
    """Drops a cursor inside the lock (its statement is reset there, not later on another thread)."""


def _ts(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _execution(row: Any) -> ExecutionRow:
    return ExecutionRow(
        execution_id=row["execution_id"],
        request_id=row["request_id"],
        pipeline_id=row["pipeline_id"],
        pipeline_version=row["pipeline_version"],
        state=row["state"],
        message=row["message"],
        created_at=_dt(row["created_at"]) or datetime.now(UTC),
        finished_at=_dt(row["finished_at"]),
        last_sequence=row["last_sequence"],
        created_by=row["created_by"],
        owner=row["owner"],
        lease_until=_dt(row["lease_until"]),
    )


def _pipeline(row: Any) -> PipelineRow:
    return PipelineRow(
        pipeline_id=row["pipeline_id"],
        version=row["version"],
        name=row["name"],
        definition=row["definition"],
        step_count=row["step_count"],
        created_at=_dt(row["created_at"]) or datetime.now(UTC),
        created_by=row["created_by"],
    )


INLINE_BYTES = 256 * 1024
"""A write carrying at most this many bytes (event payloads and blobs) may run on the caller's thread."""
CHECKPOINT_BYTES = 4 * 1024 * 1024
"""About this much written to the WAL, the store checkpoints it on its own thread (SQLite's own automatic checkpoint,
at 1,000 pages, would run inside whichever commit crossed the line — on the event loop, with two fsyncs)."""
PAGE_BYTES = 4096
BUSY_TIMEOUT_S = 5.0
"""How long a call on the store's thread waits for another connection's write lock on the file (an operator's
`sqlite3` shell, a backup): SQLite's own default. A call on the event loop never waits: it goes to the thread."""
BUSY_RETRY_S = 0.01
log = logging.getLogger(__name__)


class SqliteStore:
    """One `sqlite3` connection in WAL mode, `synchronous=NORMAL` (a commit writes the WAL without an fsync; the
    checkpoint syncs).

    A small call with a bounded answer (an execution row, a group of events, one pipeline) runs right on the event loop
    when the connection is free: tens of microseconds of SQLite, where a hop to a thread and back costs more than the
    statement on this kind of machine. Everything else — the migrations, listings, blobs, deletes, any call while the
    connection is busy, and any call that finds the file locked by another connection — is one hop of the store's own
    thread. A lock held around each use of the connection keeps the two apart; the checkpoint runs on the thread too,
    so the loop never waits for an fsync or for another process. A call of several statements is one transaction."""

    def __init__(self, db: sqlite3.Connection, thread: ThreadPoolExecutor) -> None:
        self._db = db
        self._thread = thread
        self._lock = threading.Lock()
        self._closed = False
        self._unsynced = 0
        """Bytes written to the WAL since the last checkpoint was asked for (an estimate: pages, payloads, blobs)."""

    @classmethod
    async def open(cls, url: str) -> SqliteStore:
        """Open `sqlite:///relative/path`, `sqlite:////absolute/path` or `sqlite://:memory:`."""
        path = url.split("sqlite://", 1)[1]
        path = path[1:] if path.startswith("/") else path
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imageflow-sqlite")

        def connect() -> sqlite3.Connection:
            # autocommit (isolation_level=None): a call of several statements opens its own transaction (`_write`)
            # timeout=0: SQLITE_BUSY at once (a call on the loop goes to the thread; the thread waits, see `_locked`)
            db = sqlite3.connect(path or ":memory:", timeout=0, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")  # the store checkpoints on its thread (`_written`)
            return db

        try:
            db = await asyncio.get_running_loop().run_in_executor(thread, connect)
        except BaseException:
            thread.shutdown(wait=False)
            raise
        store = cls(db, thread)
        await store._run(store._migrate)
        return store

    def _locked(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """On the store's thread: `work`, again while another connection holds the file's write lock (SQLITE_BUSY means
        nothing was applied), for up to BUSY_TIMEOUT_S."""
        give_up = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            with self._lock:
                try:
                    return work(self._db)
                except sqlite3.OperationalError as error:
                    if not _busy(error) or time.monotonic() >= give_up:
                        raise
            time.sleep(BUSY_RETRY_S)

    async def _run(self, work: Callable[[sqlite3.Connection], T], *, inline: bool = False) -> T:
        """`work` with the connection: right here when `inline` and the connection is free, else one hop of the store's
        thread (in the order asked)."""
        if inline and self._lock.acquire(blocking=False):
            try:
                return work(self._db)
            except sqlite3.OperationalError as error:
                if not _busy(error):
                    raise
            finally:
                self._lock.release()
        return await asyncio.wrap_future(self._thread.submit(self._locked, work))

    async def _write(
        self, work: Callable[[sqlite3.Connection], T], *, inline: bool = False, nbytes: int = 0, atomic: bool = False
    ) -> T:
        """A write through `_run`, counted for the checkpoint; `atomic`: its statements as one transaction (all of them
        or none)."""
        try:
            return await self._run(functools.partial(_transaction, work=work) if atomic else work, inline=inline)
        finally:
            self._written(nbytes)

    def _written(self, nbytes: int) -> None:
        """Count what a write added to the WAL; past `CHECKPOINT_BYTES`, checkpoint it on the store's thread."""
        self._unsynced += nbytes + 2 * PAGE_BYTES  # a commit writes a table page and an index page at least
        if self._unsynced >= CHECKPOINT_BYTES and not self._closed:
            self._unsynced = 0
            self._thread.submit(self._locked, self._checkpoint)

    @staticmethod
    def _checkpoint(db: sqlite3.Connection) -> None:
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # the next one tries again; the WAL keeps every commit meanwhile
            log.warning("SQLite checkpoint failed: %s", exc)

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        row = db.execute("PRAGMA user_version").fetchone()
        current = int(row[0]) if row else 0
        for number, statements in enumerate(MIGRATIONS, start=1):
            if number > current:
                _transaction(db, functools.partial(_apply, statements=statements, number=number))

    async def close(self) -> None:
        """Close the connection and stop its thread (a second close does nothing)."""
        if self._closed:
            return
        self._closed = True
        # the last connection's close checkpoints the WAL; shielded: a cancelled caller still leaves it closed
        closing = asyncio.wrap_future(self._thread.submit(self._locked, lambda db: db.close()))
        try:
            await asyncio.shield(closing)
        finally:
            self._thread.shutdown(wait=False)

    @staticmethod
    def _registry_version(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT version FROM registry_meta WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _bump_registry(db: sqlite3.Connection) -> int:
        row = db.execute("UPDATE registry_meta SET version = version + 1 WHERE id = 1 RETURNING version").fetchone()
        return int(row[0]) if row else 0

    async def upsert_tools(self, tools: list[ToolRow]) -> int:
        """Insert or replace tools by name, record their revisions and bump the registry version: one transaction."""

        def work(db: sqlite3.Connection) -> int:
            db.executemany(
                """INSERT INTO tools (name, address, manifest, updated_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET address = excluded.address, manifest = excluded.manifest,
                   updated_at = excluded.updated_at""",
                [(t.name, t.address, t.manifest, _ts(t.updated_at)) for t in tools],
            )
            db.executemany(
                """INSERT INTO tool_revisions (name, revision, address, manifest, registered_at) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (name, revision) DO NOTHING""",
                [(t.name, t.revision, t.address, t.manifest, _ts(t.updated_at)) for t in tools],
            )
            return self._bump_registry(db)

        return await self._write(work, atomic=True)

    async def list_tool_revisions(self, name: str) -> list[ToolRow]:
        """Every stored revision, oldest first."""
        rows = await self._run(
            lambda db: db.execute("SELECT * FROM tool_revisions WHERE name = ? ORDER BY revision", (name,)).fetchall()
        )
        return [
            ToolRow(r["name"], r["address"], bytes(r["manifest"]), _dt(r["registered_at"]) or datetime.now(UTC),
                    r["revision"])
            for r in rows
        ]  # fmt: skip

    async def list_tools(self) -> tuple[list[ToolRow], int]:
        """All tools and the registry version, read in one call (no write of this store comes between them)."""

        def work(db: sqlite3.Connection) -> tuple[list[Any], int]:
            return db.execute("SELECT * FROM tools ORDER BY name").fetchall(), self._registry_version(db)

        rows, version = await self._run(work)
        tools = [
            ToolRow(r["name"], r["address"], bytes(r["manifest"]), _dt(r["updated_at"]) or datetime.now(UTC))
            for r in rows
        ]
        return tools, version

    async def remove_tool(self, name: str) -> int | None:
        """Delete one tool and bump the registry version: one transaction."""

        def work(db: sqlite3.Connection) -> int | None:
            if db.execute("DELETE FROM tools WHERE name = ?", (name,)).rowcount == 0:
                return None
            return self._bump_registry(db)

        return await self._write(work, atomic=True)

    async def save_pipeline(
        self, pipeline_id: str, name: str, definition: str, step_count: int, *, new: bool, created_by: str = ""
    ) -> PipelineRow | None:
        """Next version in one INSERT ... SELECT, so concurrent saves cannot take the same number."""
        created = datetime.now(UTC)
        row = await self._write(
            lambda db: db.execute(
                """INSERT INTO pipelines (pipeline_id, version, name, definition, step_count, created_at, created_by)
                   SELECT ?, COALESCE(MAX(version), 0) + 1, ?, ?, ?, ?, ? FROM pipelines WHERE pipeline_id = ?
                   HAVING COUNT(*) > 0 OR ? RETURNING version""",
                (pipeline_id, name, definition, step_count, _ts(created), created_by, pipeline_id, new),
            ).fetchone(),
            inline=len(definition) <= INLINE_BYTES,
            nbytes=len(definition),
        )
        if row is None:
            return None
        return PipelineRow(pipeline_id, int(row[0]), name, definition, step_count, created, created_by)

    async def get_pipeline(self, pipeline_id: str, version: int) -> PipelineRow | None:
        """One version, 0 = latest."""
        args: tuple[str | int, ...]
        if version:
            where, args = "pipeline_id = ? AND version = ?", (pipeline_id, version)
        else:
            where, args = "pipeline_id = ? ORDER BY version DESC LIMIT 1", (pipeline_id,)
        # its size first (on the loop), so a large definition is read on the store's thread
        sized = f"SELECT rowid, length(definition) FROM pipelines WHERE {where}"
        found = await self._run(lambda db: db.execute(sized, args).fetchone(), inline=True)
        if found is None:
            return None
        row = await self._run(
            lambda db: db.execute("SELECT * FROM pipelines WHERE rowid = ?", (found[0],)).fetchone(),
            inline=found[1] <= INLINE_BYTES,
        )
        return _pipeline(row) if row else None

    async def list_pipelines(self, limit: int, after: tuple[datetime, str] | None) -> list[PipelineRow]:
        """Latest versions, newest first."""
        query = """SELECT p.* FROM pipelines p JOIN
                   (SELECT pipeline_id, MAX(version) AS v FROM pipelines GROUP BY pipeline_id) m
                   ON p.pipeline_id = m.pipeline_id AND p.version = m.v"""
        args: tuple[Any, ...] = ()
        if after is not None:
            query += " WHERE (p.created_at < ?) OR (p.created_at = ? AND p.pipeline_id < ?)"
            args = (_ts(after[0]), _ts(after[0]), after[1])
        query += " ORDER BY p.created_at DESC, p.pipeline_id DESC LIMIT ?"
        rows = await self._run(lambda db: db.execute(query, (*args, limit)).fetchall())
        return [_pipeline(r) for r in rows]

    async def list_pipeline_versions(self) -> list[PipelineRow]:
        """Every version of every pipeline."""
        rows = await self._run(
            lambda db: db.execute("SELECT * FROM pipelines ORDER BY pipeline_id, version").fetchall()
        )
        return [_pipeline(r) for r in rows]

    async def delete_pipeline(self, pipeline_id: str) -> int:
        """Delete all versions."""
        return await self._write(
            lambda db: db.execute("DELETE FROM pipelines WHERE pipeline_id = ?", (pipeline_id,)).rowcount
        )

    async def create_execution(self, row: ExecutionRow) -> tuple[ExecutionRow, bool]:
        """Insert unless the request_id is known (then the known execution, in the same call)."""

        def work(db: sqlite3.Connection) -> tuple[ExecutionRow, bool]:
            try:
                db.execute(
                    """INSERT INTO executions (execution_id, request_id, pipeline_id, pipeline_version, state, message,
                       created_at, finished_at, last_sequence, created_by, owner, lease_until)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        row.execution_id, row.request_id, row.pipeline_id, row.pipeline_version, row.state,
                        row.message, _ts(row.created_at), _ts(row.finished_at), row.last_sequence, row.created_by,
                        row.owner, _ts(row.lease_until),
                    ),
                )  # fmt: skip
                return row, True
            except sqlite3.IntegrityError:
                found = db.execute("SELECT * FROM executions WHERE request_id = ?", (row.request_id or "",)).fetchone()
                if found is None:
                    raise
                return _execution(found), False

        return await self._write(work, inline=True)

    async def append_events(self, execution_id: str, events: Sequence[EventWrite]) -> None:
        """The events' blobs, then the events in one multi-row INSERT (a trigger updates the execution row per row), as
        one transaction: an event never refers to bytes not stored, and a failed write leaves neither."""
        blobs = [b for e in events for b in e.blobs]
        values: list[Any] = []
        for e in events:
            values += [execution_id, e.sequence, e.payload, e.state, e.message, _ts(e.finished_at)]
        insert = (
            "INSERT INTO execution_events (execution_id, sequence, payload, state, message, finished_at) VALUES "
            + ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(events))
        )
        nbytes = sum(len(e.payload) for e in events) + sum(len(b.data) for b in blobs)
        if not blobs:
            await self._write(
                lambda db: _none(db.execute(insert, values)), inline=nbytes <= INLINE_BYTES, nbytes=nbytes
            )
            return
        now = _ts(datetime.now(UTC))

        def work(db: sqlite3.Connection) -> None:
            db.executemany(
                """INSERT INTO output_blobs (ref, execution_id, step_id, media_type, data, created_at)
                   VALUES (?, ?, ?, ?, ?, ?)""",
                [(b.ref, execution_id, b.step_id, b.media_type, b.data, now) for b in blobs],
            )
            db.execute(insert, values)

        await self._write(work, inline=nbytes <= INLINE_BYTES, nbytes=nbytes, atomic=True)

    async def get_blobs(self, refs: Sequence[str]) -> dict[str, bytes]:
        """Stored bytes by ref."""
        if not refs:
            return {}
        marks = ", ".join("?" * len(refs))
        rows = await self._run(
            lambda db: db.execute(f"SELECT ref, data FROM output_blobs WHERE ref IN ({marks})", tuple(refs)).fetchall()
        )
        return {r[0]: bytes(r[1]) for r in rows}

    async def read_blob(self, execution_id: str, ref: str, offset: int, length: int) -> tuple[int, bytes] | None:
        """A slice through SQLite's incremental blob I/O (the rest of the blob stays on disk)."""

        def read(db: sqlite3.Connection) -> tuple[int, bytes] | None:
            row = db.execute(
                "SELECT rowid, length(data) FROM output_blobs WHERE ref = ? AND execution_id = ?", (ref, execution_id)
            ).fetchone()
            if row is None:
                return None
            rowid, size = row
            try:
                with db.blobopen("output_blobs", "data", rowid, readonly=True) as blob:
                    blob.seek(min(offset, size))
                    return size, blob.read(length)
            except sqlite3.OperationalError:  # dropped (retention, another replica) since the SELECT
                return None

        return await self._run(read)

    async def delete_blobs_before(self, cutoff: datetime) -> int:
        """Retention."""
        return await self._write(
            lambda db: db.execute("DELETE FROM output_blobs WHERE created_at < ?", (_ts(cutoff),)).rowcount
        )

    async def get_execution(self, execution_id: str) -> ExecutionRow | None:
        """One execution."""
        row = await self._run(
            lambda db: db.execute("SELECT * FROM executions WHERE execution_id = ?", (execution_id,)).fetchone(),
            inline=True,
        )
        return _execution(row) if row else None

    async def find_execution_by_request(self, request_id: str) -> ExecutionRow | None:
        """By idempotency key."""
        row = await self._run(
            lambda db: db.execute("SELECT * FROM executions WHERE request_id = ?", (request_id,)).fetchone(),
            inline=True,
        )
        return _execution(row) if row else None

    async def list_events(self, execution_id: str, after_sequence: int) -> list[EventRow]:
        """Events after a sequence."""
        rows = await self._run(
            lambda db: db.execute(
                "SELECT sequence, payload FROM execution_events WHERE execution_id = ? AND sequence > ? ORDER BY sequence",
                (execution_id, after_sequence),
            ).fetchall()
        )
        return [EventRow(int(r[0]), bytes(r[1])) for r in rows]

    async def renew_leases(self, owner: str, until: datetime, execution_ids: Sequence[str]) -> list[str]:
        """Extend those of `execution_ids` that `owner` runs; the ids with a cancel request (one UPDATE ... RETURNING, as
        PostgreSQL does it)."""
        if not execution_ids:
            return []
        marks = ", ".join("?" * len(ACTIVE_STATES))
        ids = ", ".join("?" * len(execution_ids))
        rows = await self._write(
            lambda db: db.execute(
                f"""UPDATE executions SET lease_until = ? WHERE owner = ? AND execution_id IN ({ids})
                    AND state IN ({marks}) RETURNING execution_id, cancel_requested""",
                (_ts(until), owner, *execution_ids, *ACTIVE_STATES),
            ).fetchall(),
            inline=True,
        )
        return [r[0] for r in rows if r[1]]

    async def claim_expired(self, owner: str, now: datetime, until: datetime) -> list[ExecutionRow]:
        """One UPDATE ... RETURNING: a row is claimed once."""
        marks = ", ".join("?" * len(ACTIVE_STATES))
        rows = await self._write(
            lambda db: db.execute(
                f"""UPDATE executions SET owner = ?, lease_until = ?
                    WHERE state IN ({marks}) AND (lease_until IS NULL OR lease_until < ?) RETURNING *""",
                (owner, _ts(until), *ACTIVE_STATES, _ts(now)),
            ).fetchall()
        )
        return [_execution(r) for r in rows]

    async def request_cancel(self, execution_id: str) -> bool:
        """Flag it for its owner."""
        marks = ", ".join("?" * len(ACTIVE_STATES))
        changed = await self._write(
            lambda db: (
                db.execute(
                    f"UPDATE executions SET cancel_requested = 1 WHERE execution_id = ? AND state IN ({marks})",
                    (execution_id, *ACTIVE_STATES),
                ).rowcount
            ),
            inline=True,
        )
        return bool(changed > 0)

    async def list_active_executions(self) -> list[ExecutionRow]:
        """PENDING or RUNNING executions."""
        marks = ", ".join("?" for _ in ACTIVE_STATES)
        rows = await self._run(
            lambda db: db.execute(f"SELECT * FROM executions WHERE state IN ({marks})", ACTIVE_STATES).fetchall()
        )
        return [_execution(r) for r in rows]
