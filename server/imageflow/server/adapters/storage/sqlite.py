"""Embedded SQLite store (aiosqlite), the default."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
from imageflow.server.domain.store import ACTIVE_STATES, EventRow, EventWrite, ExecutionRow, PipelineRow, ToolRow

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


class SqliteStore:
    """One connection (aiosqlite runs it on its own thread); WAL mode; migrations at open."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, url: str) -> SqliteStore:
        """Open `sqlite:///relative/path`, `sqlite:////absolute/path` or `sqlite://:memory:`."""
        path = url.split("sqlite://", 1)[1]
        path = path[1:] if path.startswith("/") else path
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path or ":memory:", isolation_level=None)  # autocommit: one statement, one hop
        db.row_factory = sqlite3.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA synchronous=NORMAL")
        store = cls(db)
        await store._migrate()
        return store

    async def _migrate(self) -> None:
        async with self._db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        current = int(row[0]) if row else 0
        for number, statements in enumerate(MIGRATIONS, start=1):
            if number <= current:
                continue
            await self._db.execute("BEGIN IMMEDIATE")
            for statement in statements:
                await self._db.execute(statement)
            await self._db.execute(f"PRAGMA user_version = {number}")
            await self._db.execute("COMMIT")

    async def close(self) -> None:
        """Close the connection."""
        await self._db.close()

    async def _registry_version(self) -> int:
        async with self._db.execute("SELECT version FROM registry_meta WHERE id = 1") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def _bump_registry(self) -> int:
        async with self._db.execute(
            "UPDATE registry_meta SET version = version + 1 WHERE id = 1 RETURNING version"
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def upsert_tools(self, tools: list[ToolRow]) -> int:
        """Insert or replace tools by name."""
        await self._db.executemany(
            """INSERT INTO tools (name, address, manifest, updated_at) VALUES (?, ?, ?, ?)
               ON CONFLICT (name) DO UPDATE SET address = excluded.address, manifest = excluded.manifest,
               updated_at = excluded.updated_at""",
            [(t.name, t.address, t.manifest, _ts(t.updated_at)) for t in tools],
        )
        await self._db.executemany(
            """INSERT INTO tool_revisions (name, revision, address, manifest, registered_at) VALUES (?, ?, ?, ?, ?)
               ON CONFLICT (name, revision) DO NOTHING""",
            [(t.name, t.revision, t.address, t.manifest, _ts(t.updated_at)) for t in tools],
        )
        return await self._bump_registry()

    async def list_tool_revisions(self, name: str) -> list[ToolRow]:
        """Every stored revision, oldest first."""
        async with self._db.execute("SELECT * FROM tool_revisions WHERE name = ? ORDER BY revision", (name,)) as cursor:
            rows = await cursor.fetchall()
        return [
            ToolRow(r["name"], r["address"], bytes(r["manifest"]), _dt(r["registered_at"]) or datetime.now(UTC),
                    r["revision"])
            for r in rows
        ]  # fmt: skip

    async def list_tools(self) -> tuple[list[ToolRow], int]:
        """All tools and the registry version."""
        async with self._db.execute("SELECT * FROM tools ORDER BY name") as cursor:
            rows = await cursor.fetchall()
        tools = [
            ToolRow(r["name"], r["address"], bytes(r["manifest"]), _dt(r["updated_at"]) or datetime.now(UTC))
            for r in rows
        ]
        return tools, await self._registry_version()

    async def remove_tool(self, name: str) -> int | None:
        """Delete one tool."""
        cursor = await self._db.execute("DELETE FROM tools WHERE name = ?", (name,))
        if cursor.rowcount == 0:
            return None
        return await self._bump_registry()

    async def save_pipeline(
        self, pipeline_id: str, name: str, definition: str, step_count: int, *, new: bool, created_by: str = ""
    ) -> PipelineRow | None:
        """Next version in one INSERT ... SELECT, so concurrent saves cannot take the same number."""
        created = datetime.now(UTC)
        async with self._db.execute(
            """INSERT INTO pipelines (pipeline_id, version, name, definition, step_count, created_at, created_by)
               SELECT ?, COALESCE(MAX(version), 0) + 1, ?, ?, ?, ?, ? FROM pipelines WHERE pipeline_id = ?
               HAVING COUNT(*) > 0 OR ? RETURNING version""",
            (pipeline_id, name, definition, step_count, _ts(created), created_by, pipeline_id, new),
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        return PipelineRow(pipeline_id, int(row[0]), name, definition, step_count, created, created_by)

    async def get_pipeline(self, pipeline_id: str, version: int) -> PipelineRow | None:
        """One version, 0 = latest."""
        if version:
            query = "SELECT * FROM pipelines WHERE pipeline_id = ? AND version = ?"
            args: tuple[str | int, ...] = (pipeline_id, version)
        else:
            query, args = "SELECT * FROM pipelines WHERE pipeline_id = ? ORDER BY version DESC LIMIT 1", (pipeline_id,)
        async with self._db.execute(query, args) as cursor:
            row = await cursor.fetchone()
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
        async with self._db.execute(query, (*args, limit)) as cursor:
            rows = await cursor.fetchall()
        return [_pipeline(r) for r in rows]

    async def list_pipeline_versions(self) -> list[PipelineRow]:
        """Every version of every pipeline."""
        async with self._db.execute("SELECT * FROM pipelines ORDER BY pipeline_id, version") as cursor:
            rows = await cursor.fetchall()
        return [_pipeline(r) for r in rows]

    async def delete_pipeline(self, pipeline_id: str) -> int:
        """Delete all versions."""
        cursor = await self._db.execute("DELETE FROM pipelines WHERE pipeline_id = ?", (pipeline_id,))
        return cursor.rowcount

    async def create_execution(self, row: ExecutionRow) -> tuple[ExecutionRow, bool]:
        """Insert unless the request_id is known."""
        try:
            await self._db.execute(
                """INSERT INTO executions (execution_id, request_id, pipeline_id, pipeline_version, state, message,
                   created_at, finished_at, last_sequence, created_by, owner, lease_until)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    row.execution_id, row.request_id, row.pipeline_id, row.pipeline_version, row.state, row.message,
                    _ts(row.created_at), _ts(row.finished_at), row.last_sequence, row.created_by, row.owner,
                    _ts(row.lease_until),
                ),
            )  # fmt: skip
            return row, True
        except sqlite3.IntegrityError:
            existing = await self.find_execution_by_request(row.request_id or "")
            if existing is None:
                raise
            return existing, False

    async def append_events(self, execution_id: str, events: Sequence[EventWrite]) -> None:
        """One multi-row INSERT (one statement: atomic, one hop); a trigger updates the execution row per row. Blobs
        go first, in their own statement: an event never refers to bytes not stored (an orphan blob left by a failed
        event write is dropped by retention)."""
        blobs = [b for e in events for b in e.blobs]
        if blobs:
            now = _ts(datetime.now(UTC))
            await self._db.executemany(
                """INSERT INTO output_blobs (ref, execution_id, step_id, media_type, data, created_at)
                   VALUES (?, ?, ?, ?, ?, ?)""",
                [(b.ref, execution_id, b.step_id, b.media_type, b.data, now) for b in blobs],
            )
        values: list[Any] = []
        for e in events:
            values += [execution_id, e.sequence, e.payload, e.state, e.message, _ts(e.finished_at)]
        await self._db.execute(
            "INSERT INTO execution_events (execution_id, sequence, payload, state, message, finished_at) VALUES "
            + ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(events)),
            values,
        )

    async def get_blobs(self, refs: Sequence[str]) -> dict[str, bytes]:
        """Stored bytes by ref."""
        if not refs:
            return {}
        marks = ", ".join("?" * len(refs))
        async with self._db.execute(
            f"SELECT ref, data FROM output_blobs WHERE ref IN ({marks})", tuple(refs)
        ) as cursor:
            rows = await cursor.fetchall()
        return {r[0]: bytes(r[1]) for r in rows}

    async def delete_blobs_before(self, cutoff: datetime) -> int:
        """Retention."""
        cursor = await self._db.execute("DELETE FROM output_blobs WHERE created_at < ?", (_ts(cutoff),))
        return cursor.rowcount

    async def get_execution(self, execution_id: str) -> ExecutionRow | None:
        """One execution."""
        async with self._db.execute("SELECT * FROM executions WHERE execution_id = ?", (execution_id,)) as cursor:
            row = await cursor.fetchone()
        return _execution(row) if row else None

    async def find_execution_by_request(self, request_id: str) -> ExecutionRow | None:
        """By idempotency key."""
        async with self._db.execute("SELECT * FROM executions WHERE request_id = ?", (request_id,)) as cursor:
            row = await cursor.fetchone()
        return _execution(row) if row else None

    async def list_events(self, execution_id: str, after_sequence: int) -> list[EventRow]:
        """Events after a sequence."""
        async with self._db.execute(
            "SELECT sequence, payload FROM execution_events WHERE execution_id = ? AND sequence > ? ORDER BY sequence",
            (execution_id, after_sequence),
        ) as cursor:
            rows = await cursor.fetchall()
        return [EventRow(int(r[0]), bytes(r[1])) for r in rows]

    async def renew_leases(self, owner: str, until: datetime, execution_ids: Sequence[str]) -> list[str]:
        """Extend those of `execution_ids` that `owner` runs; the ids with a cancel request (one UPDATE ... RETURNING, as
        PostgreSQL does it)."""
        if not execution_ids:
            return []
        marks = ", ".join("?" * len(ACTIVE_STATES))
        ids = ", ".join("?" * len(execution_ids))
        async with self._db.execute(
            f"""UPDATE executions SET lease_until = ? WHERE owner = ? AND execution_id IN ({ids}) AND state IN ({marks})
                RETURNING execution_id, cancel_requested""",
            (_ts(until), owner, *execution_ids, *ACTIVE_STATES),
        ) as cursor:
            return [r[0] for r in await cursor.fetchall() if r[1]]

    async def claim_expired(self, owner: str, now: datetime, until: datetime) -> list[ExecutionRow]:
        """One UPDATE ... RETURNING: a row is claimed once."""
        marks = ", ".join("?" * len(ACTIVE_STATES))
        async with self._db.execute(
            f"""UPDATE executions SET owner = ?, lease_until = ?
                WHERE state IN ({marks}) AND (lease_until IS NULL OR lease_until < ?) RETURNING *""",
            (owner, _ts(until), *ACTIVE_STATES, _ts(now)),
        ) as cursor:
            rows = await cursor.fetchall()
        return [_execution(r) for r in rows]

    async def request_cancel(self, execution_id: str) -> bool:
        """Flag it for its owner."""
        marks = ", ".join("?" * len(ACTIVE_STATES))
        cursor = await self._db.execute(
            f"UPDATE executions SET cancel_requested = 1 WHERE execution_id = ? AND state IN ({marks})",
            (execution_id, *ACTIVE_STATES),
        )
        return cursor.rowcount > 0

    async def list_active_executions(self) -> list[ExecutionRow]:
        """PENDING or RUNNING executions."""
        marks = ", ".join("?" for _ in ACTIVE_STATES)
        async with self._db.execute(f"SELECT * FROM executions WHERE state IN ({marks})", ACTIVE_STATES) as cursor:
            rows = await cursor.fetchall()
        return [_execution(r) for r in rows]
