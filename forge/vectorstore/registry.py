"""The collection registry: one table per collection with an HNSW cosine index."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from forge.errors import InvalidEvent
from forge.vectorstore.migrations import COLLECTION_LOCK_CLASS
from forge.vectorstore.naming import index_name, table_name, validate_name
from forge.vectorstore.types import Collection

# pgvector cannot index ``vector`` columns with more dimensions than this.
MAX_INDEXED_DIMENSION = 2000

_SELECT = "SELECT name, table_name, dimension, model FROM forge_collections WHERE name = %s"


def get_collection(conn: psycopg.Connection[Any], name: str) -> Collection | None:
    row = conn.execute(_SELECT, [validate_name(name)]).fetchone()
    return Collection(*row) if row else None


def ensure_collection(
    conn: psycopg.Connection[Any], name: str, dimension: int, model: str | None
) -> Collection:
    """Return collection ``name``, creating it (table and index) on first use.

    Raises ``InvalidEvent`` when it exists with another dimension. Runs in its own
    transaction; creators of one name serialise on an advisory lock, because
    concurrent ``CREATE TABLE IF NOT EXISTS`` can still collide in the catalog.
    """
    _check_dimension(name, dimension)
    with conn.transaction():
        existing = get_collection(conn, name)
        if existing is None:
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [COLLECTION_LOCK_CLASS, name]
            )
            existing = get_collection(conn, name) or _create(conn, name, dimension, model)
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
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(existing.table)))
        conn.execute("DELETE FROM forge_collections WHERE name = %s", [name])
    return True


def _check_dimension(name: str, dimension: int) -> None:
    if not 0 < dimension <= MAX_INDEXED_DIMENSION:
        raise InvalidEvent(
            f"collection {name!r}: dimension must be 1-{MAX_INDEXED_DIMENSION}, got {dimension}"
        )


def _create(
    conn: psycopg.Connection[Any], name: str, dimension: int, model: str | None
) -> Collection:
    collection = Collection(name, table_name(name), dimension, model)
    table = sql.Identifier(collection.table)
    conn.execute(
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS {table} (
                id text PRIMARY KEY,
                text text,
                metadata jsonb NOT NULL DEFAULT '{{}}',
                embedding vector({dimension}) NOT NULL,
                model text,
                updated_at timestamptz NOT NULL DEFAULT now()
            )
            """
        ).format(table=table, dimension=sql.Literal(dimension))
    )
    conn.execute(
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {index} ON {table} USING hnsw (embedding vector_cosine_ops)"
        ).format(index=sql.Identifier(index_name(collection.table)), table=table)
    )
    conn.execute(
        "INSERT INTO forge_collections (name, table_name, dimension, model)"
        " VALUES (%s, %s, %s, %s)",
        [name, collection.table, dimension, model],
    )
    return collection
