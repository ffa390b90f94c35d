"""Re-embedding a collection into a new version while the active one keeps serving.

``begin`` creates the building version (its own table) and plans its backfill as
ranges of record ids; each range is embedded with the new model and written by
``write_backfill``, in any order, by any worker, exactly once (its event id is claimed
in ``forge_processed_events`` in the same transaction). The last range to commit
switches the collection to the new version in its own transaction. Meanwhile every
live write goes to both versions (``VectorStore.write_batch``).

Locks keep the versions consistent: a live write holds the collection's catalog row
``FOR SHARE`` for its transaction, and creating or switching a version takes it
``FOR UPDATE``. So no write that missed the building version is still in flight once
it exists, and none that wrote only the old version commits after the switch. A
backfill range copies a row only while the active row still holds the text it
embedded (locked, so a racing write waits or has won); a live write after it replaces
it in both versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from forge.errors import PermanentError, TransientError
from forge.vectorstore import catalog, versions
from forge.vectorstore.copy_binary import encode_chunks
from forge.vectorstore.naming import version_table_name
from forge.vectorstore.types import (
    Collection,
    CollectionNotFound,
    CollectionVersion,
    IndexOptions,
    JsonObject,
    Row,
    Vector,
)
from forge.vectorstore.writer import COPY_STAGING, already_processed, claim_events

Range = tuple[str | None, str | None]

_LOCK = (
    "SELECT name, table_name, dimension, model, active_version, storage FROM forge_collections"
    " WHERE name = %s FOR {}"
)
# The staged rows whose active row still holds the same text, locked in id order.
_LOCK_SOURCE = sql.SQL(
    "SELECT o.id FROM {source} o JOIN forge_stage s ON s.id = o.id AND s.text = o.text"
    " ORDER BY o.id FOR SHARE OF o"
)
_COPY_FROM_SOURCE = sql.SQL(
    """
    INSERT INTO {target} (id, text, metadata, embedding, model, model_version, text_hash)
    SELECT s.id, o.text, o.metadata, s.embedding, s.model, s.model_version, s.text_hash
    FROM forge_stage s JOIN {source} o ON o.id = s.id AND o.text = s.text
    ORDER BY s.id
    ON CONFLICT (id) DO NOTHING
    """
)
_RANGE_ROWS = sql.SQL(
    "SELECT id, text FROM {table}"
    " WHERE (%(start)s::text IS NULL OR id >= %(start)s)"
    " AND (%(stop)s::text IS NULL OR id < %(stop)s) ORDER BY id"
)
_BOUNDARIES = sql.SQL(
    "SELECT id FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM {table}) s"
    " WHERE n > 1 AND n %% %s = 1 ORDER BY id"
)


class VersionsChanged(TransientError):
    """A collection's versions changed between reading them and writing: do it again
    against the new ones."""


@dataclass(frozen=True, slots=True)
class Plan:
    """A building version and the id ranges of its backfill."""

    version: CollectionVersion
    ranges: list[Range]


@dataclass(frozen=True, slots=True)
class BackfillResult:
    """What one backfill range did: ``rows`` copied, ``duplicate`` (done before, with
    its first ``result``), whether the version is still being built (``abandoned``
    when it was dropped or rolled back), the batches done and whether this one made
    the version active."""

    rows: int = 0
    duplicate: JsonObject | None = None
    abandoned: bool = False
    batches_done: int = 0
    batches_total: int = 0
    switched: bool = False


def lock_catalog(
    conn: psycopg.Connection[Any], name: str, *, exclusive: bool = False
) -> Collection | None:
    """Collection ``name``'s catalog entry, locked to the end of the transaction."""
    query = _LOCK.format("UPDATE" if exclusive else "SHARE")
    row = conn.execute(query, [name]).fetchone()
    return Collection(*row) if row else None


def begin(
    conn: psycopg.Connection[Any],
    name: str,
    model: str,
    dimension: int,
    index: IndexOptions,
    rows_per_batch: int,
) -> Plan:
    """Create the building version of ``name`` embedded by ``model`` and plan its
    backfill; ``PermanentError`` when one is being built already, or when rows have
    no text to embed. Runs in the caller's transaction (which may claim the event
    asking for it, so that it happens once)."""
    active = lock_catalog(conn, name, exclusive=True)
    if active is None:
        raise CollectionNotFound(f"collection {name!r} does not exist")
    current = versions.building(conn, name)
    if current is not None:
        raise PermanentError(
            f"collection {name!r} is already building version {current.version}"
            f" (model {current.model!r}); drop it first to start another"
        )
    _require_texts(conn, active)
    number = versions.next_version(conn, name)
    table = version_table_name(name, number)
    building = Collection(name, table, dimension, model, number, index.storage)
    catalog.create_table(conn, building.table, dimension, index)
    versions.insert(conn, building, index, "building")
    ranges = _ranges(conn, active, rows_per_batch)
    conn.execute(
        "UPDATE forge_collection_versions SET batches_total = %s"
        " WHERE collection = %s AND version = %s",
        [len(ranges), name, number],
    )
    found = versions.get_version(conn, name, number)
    assert found is not None  # inserted above, in this transaction
    return Plan(found, ranges)


def range_rows(conn: psycopg.Connection[Any], name: str, span: Range) -> list[tuple[str, str]]:
    """The (id, text) of the active version's rows in ``span``."""
    active = catalog.get_collection(conn, name)
    if active is None:
        return []
    query = _RANGE_ROWS.format(table=sql.Identifier(active.table))
    rows = conn.execute(query, {"start": span[0], "stop": span[1]}).fetchall()
    return [(str(r[0]), str(r[1])) for r in rows if r[1] is not None]


def write_backfill(
    conn: psycopg.Connection[Any],
    name: str,
    version: int,
    rows: Sequence[Row],
    event_id: str,
    scope: str,
    result: JsonObject,
) -> BackfillResult:
    """Copy ``rows`` (made from the active rows' texts) into building ``version``,
    once per ``event_id``; the last batch switches the collection to it."""
    try:
        with conn.transaction():
            return _write_backfill(conn, name, version, rows, event_id, scope, result)
    except psycopg.errors.DeadlockDetected as exc:  # with a live write: try again
        raise VersionsChanged(f"collection {name!r}: {exc}") from exc


def switch(conn: psycopg.Connection[Any], name: str, version: int) -> CollectionVersion:
    """Make ``version`` the active version of ``name`` (the caller's transaction);
    the active one is retired."""
    lock_catalog(conn, name, exclusive=True)
    target = versions.get_version(conn, name, version)
    if target is None:
        raise PermanentError(f"collection {name!r} has no version {version}")
    conn.execute(
        "UPDATE forge_collection_versions SET state = 'retired'"
        " WHERE collection = %s AND state = 'active'",
        [name],
    )
    conn.execute(
        "UPDATE forge_collection_versions SET state = 'active', activated_at = now()"
        " WHERE collection = %s AND version = %s",
        [name, version],
    )
    conn.execute(
        "UPDATE forge_collections SET table_name = %s, dimension = %s, model = %s,"
        " active_version = %s, storage = %s WHERE name = %s",
        [target.table, target.dimension, target.model, version, target.storage, name],
    )
    return target


def rollback(conn: psycopg.Connection[Any], name: str) -> CollectionVersion:
    """Switch ``name`` back to the version that was active before the current one."""
    with conn.transaction():
        if lock_catalog(conn, name, exclusive=True) is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        found = versions.list_versions(conn, name)
        if any(v.state == "building" for v in found):
            raise PermanentError(f"collection {name!r} is building a version; drop it first")
        retired = [v for v in found if v.state == "retired" and v.activated_at is not None]
        if not retired:
            raise PermanentError(f"collection {name!r} has no earlier version to go back to")
        previous = max(retired, key=lambda v: (v.activated_at, v.version))
        return switch(conn, name, previous.version)


def drop_version(conn: psycopg.Connection[Any], name: str, version: int) -> CollectionVersion:
    """Delete ``version`` of ``name`` and its table; never the active one. Dropping
    the building version stops its re-embedding."""
    with conn.transaction():
        active = lock_catalog(conn, name, exclusive=True)
        if active is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        target = versions.get_version(conn, name, version)
        if target is None:
            raise PermanentError(f"collection {name!r} has no version {version}")
        if target.state == "active":
            raise PermanentError(
                f"version {version} is the active version of {name!r}; switch first"
            )
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(target.table)))
        conn.execute(
            "DELETE FROM forge_collection_versions WHERE collection = %s AND version = %s",
            [name, version],
        )
        return target


def _write_backfill(
    conn: psycopg.Connection[Any],
    name: str,
    version: int,
    rows: Sequence[Row],
    event_id: str,
    scope: str,
    result: JsonObject,
) -> BackfillResult:
    if not claim_events(conn, scope, [event_id], [result]):
        return BackfillResult(duplicate=already_processed(conn, scope, [event_id])[event_id])
    active = lock_catalog(conn, name)
    target = versions.get_version(conn, name, version)
    if active is None or target is None or target.state != "building":
        return BackfillResult(abandoned=True)
    copied = _copy(conn, active, target, rows) if rows else 0
    progress = conn.execute(
        "UPDATE forge_collection_versions SET batches_done = batches_done + 1"
        " WHERE collection = %s AND version = %s RETURNING batches_done, batches_total",
        [name, version],
    ).fetchone()
    assert progress is not None  # the version exists: read above, in this transaction
    done, total = int(progress[0]), int(progress[1])
    switched = done >= total
    if switched:
        switch(conn, name, version)
    return BackfillResult(copied, None, False, done, total, switched)


def _copy(
    conn: psycopg.Connection[Any],
    active: Collection,
    target: CollectionVersion,
    rows: Sequence[Row],
) -> int:
    ordered = sorted(rows, key=lambda r: r.id)
    matrix: Vector = np.stack([r.embedding for r in ordered]).astype(np.float32, copy=False)
    with conn.cursor() as cursor:
        with cursor.copy(COPY_STAGING) as copy:
            for chunk in encode_chunks(ordered, matrix):
                copy.write(chunk)
        source = sql.Identifier(active.table)
        cursor.execute(_LOCK_SOURCE.format(source=source))
        query = _COPY_FROM_SOURCE.format(target=sql.Identifier(target.table), source=source)
        cursor.execute(query)
        return cursor.rowcount


def _require_texts(conn: psycopg.Connection[Any], active: Collection) -> None:
    query = sql.SQL("SELECT count(*) FROM {} WHERE text IS NULL").format(
        sql.Identifier(active.table)
    )
    row = conn.execute(query).fetchone()
    missing = int(row[0]) if row else 0
    if missing:
        raise PermanentError(
            f"collection {active.name!r} has {missing} rows without text"
            " (stored as ready vectors): a model cannot embed them again"
        )


def _ranges(conn: psycopg.Connection[Any], active: Collection, rows_per_batch: int) -> list[Range]:
    """Consecutive id ranges of about ``rows_per_batch`` rows covering every id (rows
    added later included: the first starts at nothing, the last ends at nothing)."""
    query = _BOUNDARIES.format(table=sql.Identifier(active.table))
    starts: list[str | None] = [None]
    starts += [str(r[0]) for r in conn.execute(query, [rows_per_batch]).fetchall()]
    stops = [*starts[1:], None]
    return list(zip(starts, stops, strict=True))
