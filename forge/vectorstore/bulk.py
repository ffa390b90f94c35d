"""Fast first loads: rows copied into a new collection without its HNSW index, which
is then built once.

Maintaining an HNSW graph row by row costs most of a write; building it once over all
the rows is several times cheaper, more so with parallel maintenance workers and
enough ``maintenance_work_mem`` to hold the graph. The index is built ``CONCURRENTLY``:
searches go on meanwhile (as exact scans, the planner having no index yet) and new
writes are not refused.

One builder per collection: whoever loads a collection without its index, or builds
it, holds ``builder_lock`` meanwhile (a session advisory lock, released with the
connection if the process dies). So a worker never builds the index of a collection
``forge collections load`` is still copying, and only one worker builds a deferred one
(``deferred``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from forge.errors import PermanentError
from forge.vectorstore import catalog, writer
from forge.vectorstore.migrations import INDEX_BUILD_LOCK_CLASS
from forge.vectorstore.naming import index_name
from forge.vectorstore.types import Collection, IndexOptions, Row

# Bytes per graph element beyond the vector: neighbour lists of 2*m links at layer 0
# (pgvector's item pointers), headers and the upper layers' share, rounded up.
_GRAPH_BYTES_PER_LINK = 8
_ELEMENT_OVERHEAD_BYTES = 64
_MEMORY_FLOOR_MB = 64
# A derived size never takes more than this; give more explicitly (``IndexBuild``).
_MEMORY_CAP_MB = 2048


@dataclass(frozen=True, slots=True)
class IndexBuild:
    """How the index is built: memory for the graph (``maintenance_work_mem``) and
    parallel maintenance workers (``None``: derived from the rows)."""

    memory_mb: int | None = None
    workers: int = 2


@dataclass(frozen=True, slots=True)
class BulkLoadResult:
    rows: int
    load_s: float
    index_s: float


@contextmanager
def builder_lock(conn: psycopg.Connection[Any], name: str) -> Iterator[bool]:
    """Try to become the one loader or index builder of collection ``name``; yields
    whether this connection holds the lock (until the block ends). Never waits: a
    builder holds it for minutes, and whoever does not get it has other work."""
    key = [INDEX_BUILD_LOCK_CLASS, name]
    row = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", key).fetchone()
    held = bool(row and row[0])
    try:
        yield held
    finally:
        if held:
            conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", key)


def first_load(
    conn: psycopg.Connection[Any],
    name: str,
    dimension: int,
    model: str | None,
    chunks: Iterable[Sequence[Row]],
    index: IndexOptions,
    build: IndexBuild,
) -> BulkLoadResult:
    """Collection ``name`` created without its index, ``chunks`` copied into it, then
    its index built once; ``PermanentError`` if it has rows, or another process is
    loading it or building its index."""
    with builder_lock(conn, name) as held:
        if not held:
            raise PermanentError(
                f"collection {name!r} is being loaded or indexed by another process"
            )
        target = create_unindexed(conn, name, dimension, model, index)
        started = time.perf_counter()
        rows = load(conn, target, chunks)
        loaded = time.perf_counter()
        build_index(conn, target, index, build)
        return BulkLoadResult(rows, loaded - started, time.perf_counter() - loaded)


def create_unindexed(
    conn: psycopg.Connection[Any],
    name: str,
    dimension: int,
    model: str | None,
    index: IndexOptions,
) -> Collection:
    """Collection ``name``, created now without its index; ``PermanentError`` when it
    exists with rows already (a bulk load is a first load)."""
    with conn.transaction():
        existing = catalog.get_collection(conn, name)
        if existing is not None:
            query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(
                sql.Identifier(existing.table)
            )
            row = conn.execute(query).fetchone()
            if row and row[0]:
                raise PermanentError(
                    f"collection {name!r} has rows: a bulk load is for a new collection"
                    " (publish new-data events to add to it)"
                )
            catalog.check_dimension(existing, dimension)
            return existing
        return catalog.ensure_collection(conn, name, dimension, model, index, with_index=False)


def copy_rows(conn: psycopg.Connection[Any], collection: Collection, rows: Sequence[Row]) -> int:
    """Upsert ``rows`` into the collection's table in one transaction."""
    writer.check_rows(rows, collection.dimension)
    ordered = sorted({row.id: row for row in rows}.values(), key=lambda r: r.id)
    with conn.transaction():
        upserted, _, _ = writer.apply_writes(conn, collection, ordered, {r.event_id for r in rows})
    return upserted


def build_index(
    conn: psycopg.Connection[Any],
    collection: Collection,
    index: IndexOptions,
    build: IndexBuild,
) -> None:
    """Build the collection's HNSW index once, concurrently, with ``build``'s memory
    and workers (session settings of this connection, reset afterwards). The caller
    holds ``builder_lock``: an invalid index found is then one a dead build left."""
    if _index_exists(conn, collection.table):
        return
    memory_mb = build.memory_mb or graph_memory_mb(conn, collection, index)
    conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", [f"{memory_mb}MB"])
    conn.execute(
        "SELECT set_config('max_parallel_maintenance_workers', %s, false)", [str(build.workers)]
    )
    try:
        conn.execute(catalog.index_statement(collection.table, index, concurrently=True))
    finally:
        conn.execute("RESET maintenance_work_mem")
        conn.execute("RESET max_parallel_maintenance_workers")


def graph_memory_mb(
    conn: psycopg.Connection[Any], collection: Collection, index: IndexOptions
) -> int:
    """Enough ``maintenance_work_mem`` for the whole graph of the table's rows: a
    graph that does not fit is built far slower, on disk."""
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(collection.table))
    row = conn.execute(query).fetchone()
    rows = int(row[0]) if row else 0
    element = 4 * collection.dimension + 2 * index.m * _GRAPH_BYTES_PER_LINK
    total = rows * (element + _ELEMENT_OVERHEAD_BYTES)
    # Twice the estimate, as the build needs room beside the graph.
    return min(_MEMORY_CAP_MB, max(_MEMORY_FLOOR_MB, -(-total // 2**20) * 2))


def load(
    conn: psycopg.Connection[Any],
    collection: Collection,
    chunks: Iterable[Sequence[Row]],
) -> int:
    """Copy every chunk (one transaction each); rows written."""
    return sum(copy_rows(conn, collection, chunk) for chunk in chunks if chunk)


def _index_exists(conn: psycopg.Connection[Any], table: str) -> bool:
    state = catalog.index_state(conn, table)
    if state == "invalid":  # a concurrent build that died: drop the invalid index, build again
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(index_name(table))))
    return state == "valid"
