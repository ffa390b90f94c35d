"""What ``forge collections list | show`` reports: each collection's versions, with
their rows, model, dimension, index parameters and size on disk."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from forge.vectorstore import catalog, versions
from forge.vectorstore.types import Collection, CollectionVersion, VersionState


@dataclass(frozen=True, slots=True)
class IndexInfo:
    type: str
    m: int
    ef_construction: int
    # False while a deferred index waits for the end of the first load (or is building).
    built: bool = True


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: int
    model: str | None
    state: VersionState
    rows: int
    dimension: int
    storage: str
    index: IndexInfo
    size_bytes: int
    table: str
    created_at: datetime
    activated_at: datetime | None
    batches_done: int
    batches_total: int


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    """A collection as ``forge collections show --json`` prints it; ``model``,
    ``dimension`` and ``rows`` are the active version's, ``size_bytes`` all versions'."""

    name: str
    active_version: int
    model: str | None
    dimension: int
    rows: int
    size_bytes: int
    versions: list[VersionInfo]


def collection_names(conn: psycopg.Connection[Any]) -> list[str]:
    return [row[0] for row in conn.execute("SELECT name FROM forge_collections ORDER BY name")]


def describe(conn: psycopg.Connection[Any], collection: Collection) -> CollectionInfo:
    found = [_describe_version(conn, v) for v in versions.list_versions(conn, collection.name)]
    active = next((v for v in found if v.version == collection.version), None)
    return CollectionInfo(
        name=collection.name,
        active_version=collection.version,
        model=collection.model,
        dimension=collection.dimension,
        rows=active.rows if active else 0,
        size_bytes=sum(v.size_bytes for v in found),
        versions=found,
    )


def _describe_version(conn: psycopg.Connection[Any], version: CollectionVersion) -> VersionInfo:
    rows, size_bytes = _table_stats(conn, version.table)
    return VersionInfo(
        version=version.version,
        model=version.model,
        state=version.state,
        rows=rows,
        dimension=version.dimension,
        storage=version.storage,
        index=IndexInfo(
            "hnsw",
            version.hnsw_m,
            version.hnsw_ef_construction,
            catalog.index_state(conn, version.table) == "valid",
        ),
        size_bytes=size_bytes,
        table=version.table,
        created_at=version.created_at,
        activated_at=version.activated_at,
        batches_done=version.batches_done,
        batches_total=version.batches_total,
    )


def _table_stats(conn: psycopg.Connection[Any], table: str) -> tuple[int, int]:
    """Rows (an exact count) and bytes on disk (table, index and TOAST) of ``table``;
    zeros for a table that is gone."""
    found = conn.execute("SELECT to_regclass(%s)", [sql.Identifier(table).as_string(conn)])
    if found.fetchone() in (None, (None,)):
        return 0, 0
    query = sql.SQL("SELECT count(*), pg_total_relation_size(%s::regclass) FROM {}").format(
        sql.Identifier(table)
    )
    row = conn.execute(query, [sql.Identifier(table).as_string(conn)]).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)
