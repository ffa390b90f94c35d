"""The PostgreSQL part of a backup: the vector store's database, whole, with pg_dump's
custom format: the collections and their rows, the collection catalog, the
processed-event ledger (the markers that keep embedding exactly-once across a restore)
and the schema migrations applied.

pg_dump reads one snapshot, so the part is consistent in itself while workers write.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

from forge.backup import pgtools
from forge.backup.manifest import Part, describe_file
from forge.servers.embedded_postgres import resolve_postgres_url
from forge.settings import Settings
from forge.settings_values import redact_url

FILE = "postgres.dump"
FORMAT = "pg_dump-custom"
# Forge's own tables; a database with only these, empty, has nothing to lose.
CATALOG = "forge_collections"
LEDGER = "forge_processed_events"
MIGRATIONS = "forge_schema_migrations"


@contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """``POSTGRES_URL``, or the embedded server's (started for the block)."""
    url, embedded = resolve_postgres_url(settings)
    try:
        yield url
    finally:
        if embedded is not None:
            embedded.stop()


def dump(settings: Settings, url: str, folder: Path) -> Part:
    server = pgtools.inspect(url)
    pgtools.pg_dump(settings, server, folder / FILE)
    return Part(
        name="postgres",
        format=FORMAT,
        server_version=server.version,
        source=redact_url(url) or "",
        files=[describe_file(folder, FILE)],
    )


def contents(url: str) -> str | None:
    """What the database holds that a restore would overwrite; None when nothing."""
    with psycopg.connect(url, connect_timeout=pgtools.CONNECT_TIMEOUT_S) as conn:
        tables = _user_tables(conn)
        for table in (CATALOG, LEDGER):
            if table in tables and _has_rows(conn, table):
                return f"the PostgreSQL table {table} has rows"
        others = sorted(set(tables) - {CATALOG, LEDGER, MIGRATIONS})
        if others:
            more = ", ..." if len(others) > 3 else ""
            return f"the PostgreSQL database has tables ({', '.join(others[:3])}{more})"
    return None


def clear(url: str) -> None:
    """Drop Forge's tables and every collection table (``restore --force``): pg_restore
    replaces what the dump holds, and collections the dump lacks must not linger."""
    with psycopg.connect(url, connect_timeout=pgtools.CONNECT_TIMEOUT_S) as conn:
        tables = _user_tables(conn)
        collections: list[str] = []
        if CATALOG in tables:
            rows = conn.execute(
                sql.SQL("SELECT table_name FROM {}").format(sql.Identifier(CATALOG))
            )
            collections = [str(r[0]) for r in rows]
        for table in [*collections, CATALOG, LEDGER, MIGRATIONS]:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(table)))


def restore(settings: Settings, url: str, folder: Path, part: Part) -> None:
    pgtools.pg_restore(settings, pgtools.inspect(url), folder / FILE, part.server_version)


def _user_tables(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    rows = conn.execute(
        "SELECT tablename FROM pg_tables"
        " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
    )
    return [str(r[0]) for r in rows]


def _has_rows(conn: psycopg.Connection[tuple[object, ...]], table: str) -> bool:
    query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(table))
    row = conn.execute(query).fetchone()
    return bool(row and row[0])
