"""PostgreSQL store through asyncpg: a pool, migrations at start-up, JSONB definitions."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from imageflow.common.errors import unavailable
from imageflow.server.domain.store import ACTIVE_STATES, EventRow, EventWrite, ExecutionRow, PipelineRow, ToolRow

MIGRATIONS: list[str] = [
    """
    CREATE TABLE registry_meta (id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL);
    INSERT INTO registry_meta (id, version) VALUES (1, 0);
    CREATE TABLE tools (name TEXT PRIMARY KEY, address TEXT NOT NULL, manifest BYTEA NOT NULL,
                        updated_at TIMESTAMPTZ NOT NULL);
    CREATE TABLE pipelines (pipeline_id TEXT NOT NULL, version INTEGER NOT NULL, name TEXT NOT NULL,
                            definition JSONB NOT NULL, step_count INTEGER NOT NULL, created_at TIMESTAMPTZ NOT NULL,
                            PRIMARY KEY (pipeline_id, version));
    CREATE TABLE executions (execution_id TEXT PRIMARY KEY, request_id TEXT UNIQUE, pipeline_id TEXT NOT NULL,
                             pipeline_version INTEGER NOT NULL, state TEXT NOT NULL, message TEXT NOT NULL,
                             created_at TIMESTAMPTZ NOT NULL, finished_at TIMESTAMPTZ, last_sequence BIGINT NOT NULL);
    CREATE INDEX executions_state ON executions (state);
    CREATE TABLE execution_events (execution_id TEXT NOT NULL REFERENCES executions (execution_id) ON DELETE CASCADE,
                                   sequence BIGINT NOT NULL, payload BYTEA NOT NULL,
                                   PRIMARY KEY (execution_id, sequence));
    """,
    """
    ALTER TABLE pipelines ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE executions ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
    """,
    """
    CREATE TABLE tool_revisions (name TEXT NOT NULL, revision BIGINT NOT NULL, address TEXT NOT NULL,
                                 manifest BYTEA NOT NULL, registered_at TIMESTAMPTZ NOT NULL,
                                 PRIMARY KEY (name, revision));
    """,
    """
    CREATE TABLE output_blobs (ref TEXT PRIMARY KEY, execution_id TEXT NOT NULL, step_id TEXT NOT NULL,
                               media_type TEXT NOT NULL, data BYTEA NOT NULL, created_at TIMESTAMPTZ NOT NULL);
    CREATE INDEX output_blobs_created ON output_blobs (created_at);
    """,
    """
    ALTER TABLE executions ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE executions ADD COLUMN lease_until TIMESTAMPTZ;
    ALTER TABLE executions ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT FALSE;
    """,
    # outputs are read in slices (ReadExecutionOutput): kept uncompressed, a slice reads only its own TOAST chunks
    """
    ALTER TABLE output_blobs ALTER COLUMN data SET STORAGE EXTERNAL;
    """,
]
MIGRATION_LOCK = 0x1F1A6E
PIPELINE_COLUMNS = "pipeline_id, version, name, definition::text AS definition, step_count, created_at, created_by"

ACQUIRE_TIMEOUT_S = 5.0
UNREACHABLE = (
    OSError,
    ConnectionError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
)
"""What losing the database looks like from asyncpg: refused or reset sockets, a closed connection, a server
shutting down or starting up."""


def _execution(row: Any) -> ExecutionRow:
    return ExecutionRow(
        execution_id=row["execution_id"],
        request_id=row["request_id"],
        pipeline_id=row["pipeline_id"],
        pipeline_version=row["pipeline_version"],
        state=row["state"],
        message=row["message"],
        created_at=row["created_at"],
        finished_at=row["finished_at"],
        last_sequence=row["last_sequence"],
        created_by=row["created_by"],
        owner=row["owner"],
        lease_until=row["lease_until"],
    )


def _pipeline(row: Any) -> PipelineRow:
    return PipelineRow(
        pipeline_id=row["pipeline_id"],
        version=row["version"],
        name=row["name"],
        definition=row["definition"],
        step_count=row["step_count"],
        created_at=row["created_at"],
        created_by=row["created_by"],
    )


class PostgresStore:
    """asyncpg pool; every multi-statement change in a transaction."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str, min_size: int = 1, max_size: int = 10) -> PostgresStore:
        """Connect and apply pending migrations (serialised by an advisory lock)."""
        pool = await asyncpg.create_pool(
            url.replace("postgres://", "postgresql://", 1), min_size=min_size, max_size=max_size
        )
        store = cls(pool)
        await store._migrate()
        return store

    async def _migrate(self) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
            current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            for number, sql in enumerate(MIGRATIONS, start=1):
                if number > current:
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number)

    async def close(self) -> None:
        """Close the pool."""
        await self._pool.close()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; losing the database is UNAVAILABLE (retryable), never INTERNAL."""
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                yield conn
        except UNREACHABLE as error:
            raise unavailable(
                "STORE_UNAVAILABLE", f"the database is unreachable ({type(error).__name__}); retry in a few seconds"
            ) from None

    async def upsert_tools(self, tools: list[ToolRow]) -> int:
        """Insert or replace tools by name."""
        async with self._connection() as conn, conn.transaction():
            await conn.executemany(
                """INSERT INTO tools (name, address, manifest, updated_at) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (name) DO UPDATE SET address = EXCLUDED.address, manifest = EXCLUDED.manifest,
                   updated_at = EXCLUDED.updated_at""",
                [(t.name, t.address, t.manifest, t.updated_at) for t in tools],
            )
            await conn.executemany(
                """INSERT INTO tool_revisions (name, revision, address, manifest, registered_at)
                   VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name, revision) DO NOTHING""",
                [(t.name, t.revision, t.address, t.manifest, t.updated_at) for t in tools],
            )
            return int(
                await conn.fetchval("UPDATE registry_meta SET version = version + 1 WHERE id = 1 RETURNING version")
            )

    async def list_tools(self) -> tuple[list[ToolRow], int]:
        """All tools and the registry version."""
        async with self._connection() as conn:
            rows = await conn.fetch("SELECT * FROM tools ORDER BY name")
            version = await conn.fetchval("SELECT version FROM registry_meta WHERE id = 1")
        return [ToolRow(r["name"], r["address"], bytes(r["manifest"]), r["updated_at"]) for r in rows], int(version)

    async def remove_tool(self, name: str) -> int | None:
        """Delete one tool."""
        async with self._connection() as conn, conn.transaction():
            deleted = await conn.fetchval("DELETE FROM tools WHERE name = $1 RETURNING name", name)
            if deleted is None:
                return None
            return int(
                await conn.fetchval("UPDATE registry_meta SET version = version + 1 WHERE id = 1 RETURNING version")
            )

    async def save_pipeline(
        self, pipeline_id: str, name: str, definition: str, step_count: int, *, new: bool, created_by: str = ""
    ) -> PipelineRow | None:
        """Next version; a per-pipeline advisory lock serialises concurrent saves."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", pipeline_id)
            latest = await conn.fetchval(
                "SELECT COALESCE(MAX(version), 0) FROM pipelines WHERE pipeline_id = $1", pipeline_id
            )
            if latest == 0 and not new:
                return None
            created = datetime.now(UTC)
            await conn.execute(
                """INSERT INTO pipelines (pipeline_id, version, name, definition, step_count, created_at, created_by)
                   VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7)""",
                pipeline_id, latest + 1, name, definition, step_count, created, created_by,
            )  # fmt: skip
        return PipelineRow(pipeline_id, latest + 1, name, definition, step_count, created, created_by)

    async def get_pipeline(self, pipeline_id: str, version: int) -> PipelineRow | None:
        """One version, 0 = latest."""
        async with self._connection() as conn:
            if version:
                row = await conn.fetchrow(
                    f"SELECT {PIPELINE_COLUMNS} FROM pipelines WHERE pipeline_id = $1 AND version = $2",
                    pipeline_id,
                    version,
                )
            else:
                row = await conn.fetchrow(
                    f"""SELECT {PIPELINE_COLUMNS} FROM pipelines WHERE pipeline_id = $1
                       ORDER BY version DESC LIMIT 1""",
                    pipeline_id,
                )
        return _pipeline(row) if row else None

    async def list_pipelines(self, limit: int, after: tuple[datetime, str] | None) -> list[PipelineRow]:
        """Latest versions, newest first."""
        query = f"SELECT DISTINCT ON (pipeline_id) {PIPELINE_COLUMNS} FROM pipelines ORDER BY pipeline_id, version DESC"
        outer = f"SELECT * FROM ({query}) latest"
        args: list[Any] = []
        if after is not None:
            outer += " WHERE (created_at, pipeline_id) < ($1, $2)"
            args = [after[0], after[1]]
        outer += f" ORDER BY created_at DESC, pipeline_id DESC LIMIT ${len(args) + 1}"
        async with self._connection() as conn:
            rows = await conn.fetch(outer, *args, limit)
        return [_pipeline(r) for r in rows]

    async def list_tool_revisions(self, name: str) -> list[ToolRow]:
        """Every stored revision, oldest first."""
        async with self._connection() as conn:
            rows = await conn.fetch("SELECT * FROM tool_revisions WHERE name = $1 ORDER BY revision", name)
        return [
            ToolRow(r["name"], r["address"], bytes(r["manifest"]), r["registered_at"], int(r["revision"])) for r in rows
        ]

    async def list_pipeline_versions(self) -> list[PipelineRow]:
        """Every version of every pipeline."""
        async with self._connection() as conn:
            rows = await conn.fetch(f"SELECT {PIPELINE_COLUMNS} FROM pipelines ORDER BY pipeline_id, version")
        return [_pipeline(r) for r in rows]

    async def delete_pipeline(self, pipeline_id: str) -> int:
        """Delete all versions."""
        async with self._connection() as conn:
            status = await conn.execute("DELETE FROM pipelines WHERE pipeline_id = $1", pipeline_id)
        return int(status.split()[-1])

    async def create_execution(self, row: ExecutionRow) -> tuple[ExecutionRow, bool]:
        """Insert unless the request_id is known."""
        async with self._connection() as conn:
            inserted = await conn.fetchval(
                """INSERT INTO executions (execution_id, request_id, pipeline_id, pipeline_version, state, message,
                   created_at, finished_at, last_sequence, created_by, owner, lease_until)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                   ON CONFLICT (request_id) DO NOTHING RETURNING execution_id""",
                row.execution_id, row.request_id, row.pipeline_id, row.pipeline_version, row.state, row.message,
                row.created_at, row.finished_at, row.last_sequence, row.created_by, row.owner, row.lease_until,
            )  # fmt: skip
        if inserted is not None:
            return row, True
        existing = await self.find_execution_by_request(row.request_id or "")
        assert existing is not None
        return existing, False

    async def append_events(self, execution_id: str, events: Sequence[EventWrite]) -> None:
        """The group and the state after its last event in one statement (one round trip, atomic); output blobs, when
        there are some, in the same transaction."""
        last = events[-1]
        blobs = [b for e in events for b in e.blobs]
        async with self._connection() as conn, conn.transaction():
            if blobs:
                now = datetime.now(UTC)
                await conn.executemany(
                    """INSERT INTO output_blobs (ref, execution_id, step_id, media_type, data, created_at)
                       VALUES ($1, $2, $3, $4, $5, $6)""",
                    [(b.ref, execution_id, b.step_id, b.media_type, b.data, now) for b in blobs],
                )
            await conn.execute(
                """WITH event AS (
                       INSERT INTO execution_events (execution_id, sequence, payload)
                       SELECT $5, s, p FROM unnest($6::bigint[], $7::bytea[]) AS t(s, p))
                   UPDATE executions SET state = $1, message = $2, finished_at = $3, last_sequence = $4
                   WHERE execution_id = $5""",
                last.state, last.message, last.finished_at, last.sequence, execution_id,
                [e.sequence for e in events], [e.payload for e in events],
            )  # fmt: skip

    async def get_blobs(self, refs: Sequence[str]) -> dict[str, bytes]:
        """Stored bytes by ref."""
        if not refs:
            return {}
        async with self._connection() as conn:
            rows = await conn.fetch("SELECT ref, data FROM output_blobs WHERE ref = ANY($1::text[])", list(refs))
        return {r["ref"]: bytes(r["data"]) for r in rows}

    async def read_blob(self, execution_id: str, ref: str, offset: int, length: int) -> tuple[int, bytes] | None:
        """A slice with substring() (on uncompressed TOAST storage it fetches only the chunks it needs)."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                """SELECT octet_length(data) AS size,
                          substring(data FROM LEAST($3::bigint, octet_length(data))::int + 1 FOR $4::int) AS part
                   FROM output_blobs WHERE ref = $1 AND execution_id = $2""",
                ref, execution_id, offset, length,
            )  # fmt: skip
        return None if row is None else (int(row["size"]), bytes(row["part"]))

    async def delete_blobs_before(self, cutoff: datetime) -> int:
        """Retention."""
        async with self._connection() as conn:
            status = await conn.execute("DELETE FROM output_blobs WHERE created_at < $1", cutoff)
        return int(status.split()[-1])

    async def get_execution(self, execution_id: str) -> ExecutionRow | None:
        """One execution."""
        async with self._connection() as conn:
            row = await conn.fetchrow("SELECT * FROM executions WHERE execution_id = $1", execution_id)
        return _execution(row) if row else None

    async def find_execution_by_request(self, request_id: str) -> ExecutionRow | None:
        """By idempotency key."""
        async with self._connection() as conn:
            row = await conn.fetchrow("SELECT * FROM executions WHERE request_id = $1", request_id)
        return _execution(row) if row else None

    async def list_events(self, execution_id: str, after_sequence: int) -> list[EventRow]:
        """Events after a sequence."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT sequence, payload FROM execution_events WHERE execution_id = $1 AND sequence > $2 ORDER BY sequence",
                execution_id,
                after_sequence,
            )
        return [EventRow(int(r["sequence"]), bytes(r["payload"])) for r in rows]

    async def renew_leases(self, owner: str, until: datetime, execution_ids: Sequence[str]) -> list[str]:
        """Extend those of `execution_ids` that `owner` runs; the ids with a cancel request."""
        if not execution_ids:
            return []
        async with self._connection() as conn:
            rows = await conn.fetch(
                """UPDATE executions SET lease_until = $1
                   WHERE owner = $2 AND execution_id = ANY($3::text[]) AND state = ANY($4::text[])
                   RETURNING execution_id, cancel_requested""",
                until, owner, list(execution_ids), list(ACTIVE_STATES),
            )  # fmt: skip
        return [r["execution_id"] for r in rows if r["cancel_requested"]]

    async def claim_expired(self, owner: str, now: datetime, until: datetime) -> list[ExecutionRow]:
        """One UPDATE ... RETURNING (row locks): a row is claimed by one replica."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                """UPDATE executions SET owner = $1, lease_until = $2
                   WHERE state = ANY($3::text[]) AND (lease_until IS NULL OR lease_until < $4) RETURNING *""",
                owner, until, list(ACTIVE_STATES), now,
            )  # fmt: skip
        return [_execution(r) for r in rows]

    async def request_cancel(self, execution_id: str) -> bool:
        """Flag it for its owner."""
        async with self._connection() as conn:
            status = await conn.execute(
                "UPDATE executions SET cancel_requested = TRUE WHERE execution_id = $1 AND state = ANY($2::text[])",
                execution_id, list(ACTIVE_STATES),
            )  # fmt: skip
        return int(status.split()[-1]) > 0

    async def list_active_executions(self) -> list[ExecutionRow]:
        """PENDING or RUNNING executions."""
        async with self._connection() as conn:
            rows = await conn.fetch("SELECT * FROM executions WHERE state = ANY($1::text[])", list(ACTIVE_STATES))
        return [_execution(r) for r in rows]
