"""Persistence behind one protocol: SQLite (embedded default) and PostgreSQL (asyncpg)."""

from __future__ import annotations

from imageflow.server.domain.store import Store


async def open_store(url: str) -> Store:
    """Open (and migrate) the store named by a database URL."""
    if url.startswith("sqlite:"):
        from imageflow.server.adapters.storage.sqlite import SqliteStore

        return await SqliteStore.open(url)
    if url.startswith(("postgresql:", "postgres:")):
        from imageflow.server.adapters.storage.postgres import PostgresStore

        return await PostgresStore.open(url)
    raise ValueError(f"unsupported database URL scheme in {url.split(':', 1)[0]!r}; use sqlite:/// or postgresql://")


__all__ = ["Store", "open_store"]
