"""Deferred HNSW indexes: collections created by ``new-data`` events start without
their index, and a worker builds it once when their first load is over.

When a first event creates a collection, nothing tells how large its first load will
be; maintaining the graph row by row costs several times what one build over every row
does. So an event-created collection starts without its index (searches are exact
scans meanwhile: right, and cheap while the table is small), and ``build`` makes it
once, concurrently, with parallel maintenance workers and a sized
``maintenance_work_mem`` (``bulk.build_index``), while writes go on. When a load counts
as over is the new-data worker's rule (``consumers.deferred_index``); this module gives
it what it looks at, and the build.

Only the active version is ever waiting for its index: versions a re-embedding builds
are created with theirs. Whether a table has its index is read from PostgreSQL's
catalog each time, not recorded beside it, so it cannot go stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from forge.vectorstore import bulk, catalog, versions
from forge.vectorstore.naming import INDEX_SUFFIX, validate_name
from forge.vectorstore.types import Collection, IndexOptions

BuildResult = Literal["built", "busy", "indexed", "gone"]

_UNINDEXED = """
SELECT c.name FROM forge_collections c
WHERE NOT EXISTS (
    SELECT 1 FROM pg_index i
    WHERE i.indexrelid = to_regclass(quote_ident(c.table_name || %s))
    AND i.indisvalid
)
ORDER BY c.name
"""


@dataclass(frozen=True, slots=True)
class Unindexed:
    """A collection whose active version has no usable HNSW index yet, and its rows
    (counted up to the cap asked for)."""

    collection: Collection
    rows: int


def pending(conn: psycopg.Connection[Any], name: str, rows_cap: int) -> Unindexed | None:
    """Collection ``name`` if its active table has no valid index (a build may be
    running), with its rows counted up to ``rows_cap``; ``None`` when it has one, or
    there is no such collection."""
    found = catalog.get_collection(conn, name)
    if found is None or catalog.index_state(conn, found.table) == "valid":
        return None
    query = sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} LIMIT %s) s").format(
        sql.Identifier(found.table)
    )
    row = conn.execute(query, [rows_cap]).fetchone()
    return Unindexed(found, int(row[0]) if row else 0)


def quiet_s(conn: psycopg.Connection[Any], collection: Collection) -> float | None:
    """Seconds since the last write to ``collection``'s rows, by any process, on the
    database's clock; ``None`` when it has none. Scans the table: asked rarely."""
    query = sql.SQL("SELECT extract(epoch FROM now() - max(updated_at)) FROM {}").format(
        sql.Identifier(collection.table)
    )
    row = conn.execute(query).fetchone()
    return float(row[0]) if row and row[0] is not None else None


def unindexed(conn: psycopg.Connection[Any]) -> list[str]:
    """Every collection whose active table has no valid HNSW index."""
    return [str(row[0]) for row in conn.execute(_UNINDEXED, [INDEX_SUFFIX]).fetchall()]


def build(conn: psycopg.Connection[Any], name: str, how: bulk.IndexBuild) -> BuildResult:
    """Build collection ``name``'s deferred index, unless another process is building
    it or loading the collection (``"busy"``: it builds it), it has one
    (``"indexed"``) or it is gone. ``conn``: autocommit, held for the whole build."""
    with bulk.builder_lock(conn, name) as held:
        if not held:
            return "busy"
        found = catalog.get_collection(conn, name)
        if found is None:
            return "gone"
        if catalog.index_state(conn, found.table) == "valid":
            return "indexed"
        try:
            bulk.build_index(conn, found, _index_of(conn, found), how)
        except psycopg.errors.UndefinedTable:  # dropped (or switched away and dropped)
            return "gone"
        return "built"


def _index_of(conn: psycopg.Connection[Any], collection: Collection) -> IndexOptions:
    """The HNSW parameters recorded for the collection's active version at its creation."""
    version = versions.get_version(conn, collection.name, collection.version)
    if version is None:
        return IndexOptions(storage=collection.storage)
    return IndexOptions(version.hnsw_m, version.hnsw_ef_construction, storage=version.storage)


class DeferredIndexes:
    """``VectorStore.indexes``: thread-safe. Reads use the store's pool; a build gets a
    connection of its own, so minutes of ``CREATE INDEX`` take none from the writers."""

    def __init__(self, url: str, pool: ConnectionPool[Any], connect_timeout_s: int) -> None:
        self._url = url
        self._pool = pool
        self._connect_timeout_s = connect_timeout_s

    def pending(self, name: str, rows_cap: int) -> Unindexed | None:
        with self._pool.connection() as conn:
            return pending(conn, validate_name(name), rows_cap)

    def quiet_s(self, collection: Collection) -> float | None:
        with self._pool.connection() as conn:
            return quiet_s(conn, collection)

    def unindexed(self) -> list[str]:
        with self._pool.connection() as conn:
            return unindexed(conn)

    def build(self, name: str, how: bulk.IndexBuild | None = None) -> BuildResult:
        """Build collection ``name``'s deferred index now (see ``build``)."""
        with psycopg.connect(
            self._url, autocommit=True, connect_timeout=self._connect_timeout_s
        ) as conn:
            return build(conn, validate_name(name), how or bulk.IndexBuild())
