"""The repository protocol and the records it stores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

ACTIVE_STATES = ("PENDING", "RUNNING")


@dataclass(frozen=True)
class ToolRow:
    """A registered tool: its manifest (serialized imageflow.v1.Tool) and address."""

    name: str
    address: str
    manifest: bytes
    updated_at: datetime
    revision: int = 1
    """The manifest's revision (also inside `manifest`); the store keeps every revision."""


@dataclass(frozen=True)
class PipelineRow:
    """One immutable pipeline version; `definition` is the Pipeline as JSON."""

    pipeline_id: str
    version: int
    name: str
    definition: str
    step_count: int
    created_at: datetime
    created_by: str = ""
    """The principal that saved this version."""


@dataclass(frozen=True)
class ExecutionRow:
    """An execution's summary; its detail lives in its events."""

    execution_id: str
    request_id: str | None
    pipeline_id: str
    pipeline_version: int
    state: str
    message: str
    created_at: datetime
    finished_at: datetime | None
    last_sequence: int
    created_by: str = ""
    """The principal that started it."""
    owner: str = ""
    """The replica running it (its id changes on every start)."""
    lease_until: datetime | None = None
    """While running: the owner renews this; past it, another replica may mark the execution interrupted."""


@dataclass(frozen=True)
class BlobWrite:
    """Output bytes stored apart from the event that refers to them."""

    ref: str
    step_id: str
    media_type: str
    data: bytes


@dataclass(frozen=True)
class EventWrite:
    """One event to store, with the execution's state after it, and the output blobs it refers to."""

    sequence: int
    payload: bytes
    state: str
    message: str
    finished_at: datetime | None
    blobs: tuple[BlobWrite, ...] = ()


@dataclass(frozen=True)
class EventRow:
    """One stored ExecutionEvent (serialized protobuf)."""

    sequence: int
    payload: bytes


class Store(Protocol):
    """Everything the control plane persists."""

    async def close(self) -> None:
        """Release connections."""

    # tool registry
    async def upsert_tools(self, tools: list[ToolRow]) -> int:
        """Insert or replace tools by name; returns the new registry version."""

    async def list_tools(self) -> tuple[list[ToolRow], int]:
        """All tools by name, and the registry version."""

    async def remove_tool(self, name: str) -> int | None:
        """Delete a tool; the new registry version, or None when it did not exist."""

    async def list_tool_revisions(self, name: str) -> list[ToolRow]:
        """Every stored revision of a tool's manifest, oldest first (kept after the tool is removed)."""

    # pipelines
    async def save_pipeline(
        self, pipeline_id: str, name: str, definition: str, step_count: int, *, new: bool, created_by: str = ""
    ) -> PipelineRow | None:
        """Store the next version (1 when `new`); None when `pipeline_id` is unknown and not `new`."""

    async def get_pipeline(self, pipeline_id: str, version: int) -> PipelineRow | None:
        """One version (0 = latest)."""

    async def list_pipelines(self, limit: int, after: tuple[datetime, str] | None) -> list[PipelineRow]:
        """Latest versions, newest first, after a (created_at, id) cursor."""

    async def delete_pipeline(self, pipeline_id: str) -> int:
        """Delete every version; returns how many."""

    async def list_pipeline_versions(self) -> list[PipelineRow]:
        """Every version of every pipeline (for checking a tool change against them)."""

    # executions
    async def create_execution(self, row: ExecutionRow) -> tuple[ExecutionRow, bool]:
        """Insert; with a known request_id returns the existing row and False."""

    async def append_events(self, execution_id: str, events: Sequence[EventWrite]) -> None:
        """Store events (in sequence order), their blobs and the execution's state after the last, in one
        transaction."""

    async def get_blobs(self, refs: Sequence[str]) -> dict[str, bytes]:
        """The stored bytes of these blob refs (refs expired or unknown are absent)."""

    async def read_blob(self, execution_id: str, ref: str, offset: int, length: int) -> tuple[int, bytes] | None:
        """Up to `length` bytes of an output blob of `execution_id` from `offset`, with the blob's whole length; None
        when the execution has no such blob (unknown, or past its retention). Reads only the bytes asked for."""

    async def delete_blobs_before(self, cutoff: datetime) -> int:
        """Drop output blobs stored before `cutoff` (retention); returns how many."""

    async def get_execution(self, execution_id: str) -> ExecutionRow | None:
        """One execution."""

    async def find_execution_by_request(self, request_id: str) -> ExecutionRow | None:
        """The execution started with this idempotency key."""

    async def list_events(self, execution_id: str, after_sequence: int) -> list[EventRow]:
        """Stored events with a larger sequence, in order."""

    async def list_active_executions(self) -> list[ExecutionRow]:
        """Executions still PENDING or RUNNING."""

    async def renew_leases(self, owner: str, until: datetime, execution_ids: Sequence[str]) -> list[str]:
        """Extend the leases of `owner`'s active executions among `execution_ids` (those still running in the
        owner's process: one it no longer runs — its end could not be stored — lets its lease run out and is
        recovered); returns those whose cancellation was requested (by any replica) since."""

    async def claim_expired(self, owner: str, now: datetime, until: datetime) -> list[ExecutionRow]:
        """Atomically take over the active executions whose lease ran out before `now` (or that have none): their
        owner died. Each is claimed by exactly one replica."""

    async def request_cancel(self, execution_id: str) -> bool:
        """Ask the owner of an active execution to cancel it; False when it is not active."""
