"""Versioned schema migrations, applied on start.

Each migration runs once per database, in version order, inside one transaction that
holds a PostgreSQL advisory lock: concurrent workers starting together serialise on
the lock, and the later ones find nothing left to do. A failed migration rolls back
completely (PostgreSQL DDL is transactional), so a retry starts from a clean state.

Collection tables are created on demand rather than here; a migration that changes
them can be a Python step iterating over ``forge_collections``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import sql

log = structlog.get_logger(__name__)

# Advisory lock keys shared by every Forge process (any fixed numbers will do).
SCHEMA_LOCK_KEY = 0x466F7267_0001
COLLECTION_LOCK_CLASS = 0x466F7267
# Held (per collection name) by whoever loads a collection without its index or builds it.
INDEX_BUILD_LOCK_CLASS = 0x466F7268

Step = str | Callable[[psycopg.Connection[Any]], None]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    steps: tuple[Step, ...]


def _add_row_fingerprints(conn: psycopg.Connection[Any]) -> None:
    """Give every collection table the model version and text hash columns. Rows
    written before have neither (NULL): they are embedded again on their next upsert,
    rather than having this migration hash every text of every collection."""
    for (table,) in conn.execute("SELECT table_name FROM forge_collections").fetchall():
        conn.execute(
            sql.SQL(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS model_version text,"
                " ADD COLUMN IF NOT EXISTS text_hash text"
            ).format(sql.Identifier(table))
        )


def _version_existing_collections(conn: psycopg.Connection[Any]) -> None:
    """Record each collection's table as its version 1, the active one, with the HNSW
    parameters its index was built with (pgvector's defaults where none were set)."""
    rows = conn.execute("SELECT name, table_name, dimension, model FROM forge_collections")
    for name, table, dimension, model in rows.fetchall():
        m, ef_construction = _index_parameters(conn, f"{table}_embedding_hnsw")
        conn.execute(
            "INSERT INTO forge_collection_versions (collection, version, table_name, model,"
            " dimension, hnsw_m, hnsw_ef_construction, state, activated_at)"
            " VALUES (%s, 1, %s, %s, %s, %s, %s, 'active', now())",
            [name, table, model, dimension, m, ef_construction],
        )


def _index_parameters(conn: psycopg.Connection[Any], index: str) -> tuple[int, int]:
    row = conn.execute("SELECT reloptions FROM pg_class WHERE relname = %s", [index]).fetchone()
    options = dict(o.split("=", 1) for o in (row[0] if row and row[0] else []))
    return int(options.get("m", 16)), int(options.get("ef_construction", 64))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        # As recorded in forge_schema_migrations of every database migrated since.
        "pgvector, collection registry and processed events",
        (
            "CREATE EXTENSION IF NOT EXISTS vector",
            """
            CREATE TABLE forge_collections (
                name text PRIMARY KEY,
                table_name text NOT NULL UNIQUE,
                dimension integer NOT NULL CHECK (dimension > 0),
                model text,
                created_at timestamptz NOT NULL DEFAULT now()
            )
            """,
            """
            CREATE TABLE forge_processed_events (
                scope text NOT NULL,
                event_id text NOT NULL,
                processed_at timestamptz NOT NULL DEFAULT now(),
                result jsonb NOT NULL DEFAULT '{}',
                PRIMARY KEY (scope, event_id)
            )
            """,
            # For pruning old markers by age.
            "CREATE INDEX forge_processed_events_processed_at"
            " ON forge_processed_events (processed_at)",
        ),
    ),
    Migration(2, "row model versions and text hashes", (_add_row_fingerprints,)),
    Migration(
        3,
        "collection versions",
        (
            """
            CREATE TABLE forge_collection_versions (
                collection text NOT NULL REFERENCES forge_collections (name) ON DELETE CASCADE,
                version integer NOT NULL CHECK (version > 0),
                table_name text NOT NULL UNIQUE,
                model text,
                dimension integer NOT NULL CHECK (dimension > 0),
                hnsw_m integer NOT NULL,
                hnsw_ef_construction integer NOT NULL,
                state text NOT NULL CHECK (state IN ('active', 'building', 'retired')),
                -- A building version's backfill: batches planned and written so far.
                batches_total integer NOT NULL DEFAULT 0,
                batches_done integer NOT NULL DEFAULT 0,
                storage text NOT NULL DEFAULT 'vector' CHECK (storage IN ('vector', 'halfvec')),
                created_at timestamptz NOT NULL DEFAULT now(),
                activated_at timestamptz,
                PRIMARY KEY (collection, version)
            )
            """,
            # One active and at most one building version per collection.
            "CREATE UNIQUE INDEX forge_collection_versions_one_active"
            " ON forge_collection_versions (collection) WHERE state = 'active'",
            "CREATE UNIQUE INDEX forge_collection_versions_one_building"
            " ON forge_collection_versions (collection) WHERE state = 'building'",
            "ALTER TABLE forge_collections ADD COLUMN active_version integer NOT NULL DEFAULT 1,"
            " ADD COLUMN storage text NOT NULL DEFAULT 'vector'",
            _version_existing_collections,
        ),
    ),
)


_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS forge_schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def apply_migrations(
    conn: psycopg.Connection[Any], migrations: Sequence[Migration] = MIGRATIONS
) -> list[int]:
    """Apply the migrations not yet recorded; return the versions applied now."""
    _check_order(migrations)
    applied_now: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEMA_LOCK_KEY])
        conn.execute(_CREATE_LEDGER)
        done = {row[0] for row in conn.execute("SELECT version FROM forge_schema_migrations")}
        _warn_if_newer(done, migrations)
        for migration in migrations:
            if migration.version in done:
                continue
            _apply_one(conn, migration)
            applied_now.append(migration.version)
    return applied_now


def migrate(url: str, *, connect_timeout_s: int = 10) -> list[int]:
    """Connect to ``url`` and apply pending migrations."""
    with psycopg.connect(url, connect_timeout=connect_timeout_s) as conn:
        return apply_migrations(conn)


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The highest applied migration version (0 for an empty database)."""
    exists = conn.execute("SELECT to_regclass('forge_schema_migrations')").fetchone()
    if not exists or exists[0] is None:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM forge_schema_migrations").fetchone()
    return int(row[0]) if row else 0


def _apply_one(conn: psycopg.Connection[Any], migration: Migration) -> None:
    for step in migration.steps:
        if isinstance(step, str):
            conn.execute(step)
        else:
            step(conn)
    conn.execute(
        "INSERT INTO forge_schema_migrations (version, name) VALUES (%s, %s)",
        [migration.version, migration.name],
    )
    log.info("applied schema migration", version=migration.version, name=migration.name)


def _check_order(migrations: Sequence[Migration]) -> None:
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise ValueError(f"migration versions must be unique and ascending: {versions}")


def _warn_if_newer(done: set[int], migrations: Sequence[Migration]) -> None:
    known = {m.version for m in migrations}
    newer = sorted(done - known)
    if newer:
        # A newer Forge migrated this database; older code may still work, so go on.
        log.warning("database has schema migrations this Forge does not know", versions=newer)
