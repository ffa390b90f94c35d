"""The versions of each collection (``forge_collection_versions``).

Every collection has one active version, whose table ``forge_collections`` points at,
and may have one version being built (re-embedded with another model) and retired
versions kept for a rollback. Each version is a table of its own, so a search reads
exactly one version, never a mix.
"""

from __future__ import annotations

from typing import Any

import psycopg

from forge.vectorstore.types import Collection, CollectionVersion, IndexOptions, VersionState

_COLUMNS = (
    "collection, version, table_name, model, dimension, hnsw_m, hnsw_ef_construction,"
    " state, created_at, activated_at, batches_total, batches_done, storage"
)
_INSERT = """
INSERT INTO forge_collection_versions (collection, version, table_name, model, dimension,
    hnsw_m, hnsw_ef_construction, state, activated_at, storage)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, CASE WHEN %s = 'active' THEN now() END, %s)
"""


def insert(
    conn: psycopg.Connection[Any], collection: Collection, index: IndexOptions, state: VersionState
) -> None:
    """Record ``collection.version`` (its table, model and dimension) in ``state``."""
    conn.execute(
        _INSERT,
        [
            collection.name,
            collection.version,
            collection.table,
            collection.model,
            collection.dimension,
            index.m,
            index.ef_construction,
            state,
            state,
            index.storage,
        ],
    )


def list_versions(conn: psycopg.Connection[Any], name: str) -> list[CollectionVersion]:
    """Collection ``name``'s versions, oldest first."""
    query = f"SELECT {_COLUMNS} FROM forge_collection_versions WHERE collection = %s ORDER BY 2"
    return [CollectionVersion(*row) for row in conn.execute(query, [name]).fetchall()]


def get_version(conn: psycopg.Connection[Any], name: str, version: int) -> CollectionVersion | None:
    query = (
        f"SELECT {_COLUMNS} FROM forge_collection_versions WHERE collection = %s AND version = %s"
    )
    row = conn.execute(query, [name, version]).fetchone()
    return CollectionVersion(*row) if row else None


def building(conn: psycopg.Connection[Any], name: str) -> CollectionVersion | None:
    """Collection ``name``'s version being built, if any."""
    query = (
        f"SELECT {_COLUMNS} FROM forge_collection_versions"
        " WHERE collection = %s AND state = 'building'"
    )
    row = conn.execute(query, [name]).fetchone()
    return CollectionVersion(*row) if row else None


def next_version(conn: psycopg.Connection[Any], name: str) -> int:
    query = (
        "SELECT coalesce(max(version), 0) + 1 FROM forge_collection_versions WHERE collection = %s"
    )
    row = conn.execute(query, [name]).fetchone()
    return int(row[0]) if row else 1
