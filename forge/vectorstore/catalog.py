"""The collection catalog (``forge_collections``) and the table, with its HNSW cosine
index, behind each collection."""

from __future__ import annotations

from typing import Any, Literal

import psycopg
from psycopg import sql

from forge.errors import InvalidEvent
from forge.vectorstore import versions
from forge.vectorstore.migrations import COLLECTION_LOCK_CLASS
from forge.vectorstore.naming import index_name, table_name, validate_name
from forge.vectorstore.types import Collection, IndexOptions

# pgvector cannot index ``vector`` columns with more dimensions than this.
MAX_INDEXED_DIMENSION = 2000
PGVECTOR_DEFAULTS = IndexOptions()
# "invalid": a concurrent build still running, or one that died (the planner skips it).
IndexState = Literal["valid", "invalid", "missing"]

_SELECT = (
    "SELECT name, table_name, dimension, model, active_version, storage FROM forge_collections"
    " WHERE name = %s"
)


def get_collection(conn: psycopg.Connection[Any], name: str) -> Collection | None:
    row = conn.execute(_SELECT, [validate_name(name)]).fetchone()
    return Collection(*row) if row else None


def ensure_collection(
    conn: psycopg.Connection[Any],
    name: str,
    dimension: int,
    model: str | None,
    index: IndexOptions = PGVECTOR_DEFAULTS,
    *,
    with_index: bool = True,
) -> Collection:
    """Return collection ``name``, creating it (table and ``index``) on first use.

    Raises ``InvalidEvent`` when it exists with another dimension. Runs in its own
    transaction, or in a savepoint of the caller's: the creation then commits or rolls
    back with the caller's writes. Creators of one name serialise on an advisory lock
    held to the end of the outer transaction, because concurrent ``CREATE TABLE IF NOT
    EXISTS`` can still collide in the catalog; a later creator then finds the
    collection, or creates it if the first one rolled back.
    """
    _check_indexable(name, dimension)
    with conn.transaction():
        existing = get_collection(conn, name)
        if existing is None:
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [COLLECTION_LOCK_CLASS, name]
            )
            existing = get_collection(conn, name) or _create(
                conn, name, dimension, model, index, with_index=with_index
            )
    check_dimension(existing, dimension)
    return existing


def check_dimension(collection: Collection, dimension: int) -> None:
    if dimension != collection.dimension:
        raise InvalidEvent(
            f"collection {collection.name!r} has dimension {collection.dimension},"
            f" got a {dimension}-d vector"
        )


def drop_collection(conn: psycopg.Connection[Any], name: str) -> bool:
    """Delete a collection and its rows; True if it existed."""
    with conn.transaction():
        existing = get_collection(conn, name)
        if existing is None:
            return False
        tables = {existing.table, *(v.table for v in versions.list_versions(conn, name))}
        for table in sorted(tables):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        conn.execute("DELETE FROM forge_collections WHERE name = %s", [name])
    return True


def _check_indexable(name: str, dimension: int) -> None:
    if not 0 < dimension <= MAX_INDEXED_DIMENSION:
        raise InvalidEvent(
            f"collection {name!r}: dimension must be 1-{MAX_INDEXED_DIMENSION}, got {dimension}"
        )


def _create(
    conn: psycopg.Connection[Any],
    name: str,
    dimension: int,
    model: str | None,
    index: IndexOptions,
    *,
    with_index: bool = True,
) -> Collection:
    collection = Collection(name, table_name(name), dimension, model, 1, index.storage)
    create_table(conn, collection.table, dimension, index, with_index=with_index)
    conn.execute(
        "INSERT INTO forge_collections (name, table_name, dimension, model, storage)"
        " VALUES (%s, %s, %s, %s, %s)",
        [name, collection.table, dimension, model, index.storage],
    )
    versions.insert(conn, collection, index, "active")
    return collection


def create_table(
    conn: psycopg.Connection[Any],
    table_name: str,
    dimension: int,
    index: IndexOptions,
    *,
    with_index: bool = True,
) -> None:
    """A collection version's table and its HNSW cosine index (built later, once,
    by ``bulk.build_index`` for a bulk load: ``with_index=False``)."""
    table = sql.Identifier(table_name)
    conn.execute(
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS {table} (
                id text PRIMARY KEY,
                text text,
                metadata jsonb NOT NULL DEFAULT '{{}}',
                embedding {storage}({dimension}) NOT NULL,
                model text,
                updated_at timestamptz NOT NULL DEFAULT now(),
                model_version text,
                text_hash text
            )
            """
        ).format(table=table, dimension=sql.Literal(dimension), storage=sql.SQL(index.storage))
    )
    if with_index:
        conn.execute(index_statement(table_name, index))


def index_state(conn: psycopg.Connection[Any], table_name: str) -> IndexState:
    """Whether the HNSW index of collection table ``table_name`` exists and is usable."""
    row = conn.execute(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
        [sql.Identifier(index_name(table_name)).as_string(conn)],
    ).fetchone()
    if row is None:
        return "missing"
    return "valid" if row[0] else "invalid"


def index_statement(
    table_name: str, index: IndexOptions, *, concurrently: bool = False
) -> sql.Composed:
    """``CREATE INDEX`` of a collection table's HNSW cosine index."""
    return sql.SQL(
        "CREATE INDEX {how} IF NOT EXISTS {index} ON {table} USING hnsw"
        " (embedding {operators}) WITH (m = {m}, ef_construction = {ef_construction})"
    ).format(
        how=sql.SQL("CONCURRENTLY" if concurrently else ""),
        operators=sql.SQL(f"{index.storage}_cosine_ops"),
        index=sql.Identifier(index_name(table_name)),
        table=sql.Identifier(table_name),
        m=sql.Literal(index.m),
        ef_construction=sql.Literal(index.ef_construction),
    )
