"""The write path: exactly-once batch upserts and deletes.

One transaction per batch:

1. Claim the batch's event ids in ``forge_processed_events`` with
   ``INSERT ... ON CONFLICT DO NOTHING RETURNING``. Ids that come back are ours;
   the others were processed before, or a racing worker holds them (the insert waits
   for that worker's transaction, so we see its outcome, never a half-written state).
2. Apply only the claimed events' writes: binary COPY into a per-connection temp
   staging table, one ``INSERT ... SELECT ... ON CONFLICT (id) DO UPDATE``, one
   ``DELETE``, and one ``UPDATE`` of metadata for rows whose text and model did not
   change (``MetadataUpdate``).
3. Commit: the markers and the rows become visible together, or not at all.

Within a batch the last write to a record id wins, in the order given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from forge.vectorstore.copy_binary import STAGING_COLUMNS, encode_chunks, metadata_json
from forge.vectorstore.types import (
    Collection,
    Delete,
    InvalidWrite,
    JsonObject,
    MetadataUpdate,
    Row,
    Vector,
    Write,
    WriteResult,
)

STAGING_TABLE = "forge_stage"
# Unconstrained ``vector`` so one staging table serves every dimension; ON COMMIT
# DELETE ROWS empties it at each commit without catalog churn.
CREATE_STAGING = f"""
CREATE TEMP TABLE IF NOT EXISTS {STAGING_TABLE} (
    id text, text text, metadata jsonb, embedding vector, model text,
    model_version text, text_hash text
) ON COMMIT DELETE ROWS
"""
COPY_STAGING = (
    f"COPY {STAGING_TABLE} ({', '.join(STAGING_COLUMNS)}) FROM STDIN WITH (FORMAT BINARY)"
)
_UPSERT = sql.SQL(
    f"""
    INSERT INTO {{table}} AS t
        (id, text, metadata, embedding, model, model_version, text_hash, updated_at)
    SELECT id, text, metadata, embedding, model, model_version, text_hash, now()
    FROM {STAGING_TABLE}
    ON CONFLICT (id) DO UPDATE SET
        text = EXCLUDED.text,
        metadata = EXCLUDED.metadata,
        embedding = EXCLUDED.embedding,
        model = EXCLUDED.model,
        model_version = EXCLUDED.model_version,
        text_hash = EXCLUDED.text_hash,
        updated_at = EXCLUDED.updated_at
    """
)
# Only where the row is still the one the writer compared against: a racing write that
# changed its text or model meanwhile wins, as if it had come after.
_UPDATE_METADATA = sql.SQL(
    """
    UPDATE {table} AS t SET metadata = u.metadata, updated_at = now()
    FROM unnest(%s::text[], %s::text[]::jsonb[], %s::text[], %s::text[])
        AS u(id, metadata, text_hash, model_version)
    WHERE t.id = u.id AND t.text_hash = u.text_hash AND t.model_version = u.model_version
    """
)
_CLAIM = """
INSERT INTO forge_processed_events (scope, event_id, result)
SELECT %s, e.id, e.result FROM unnest(%s::text[], %s::jsonb[]) WITH ORDINALITY AS e(id, result, n)
ORDER BY e.n
ON CONFLICT DO NOTHING
RETURNING event_id
"""
_PROCESSED = """
SELECT event_id, result FROM forge_processed_events WHERE scope = %s AND event_id = ANY(%s)
"""


def already_processed(
    conn: psycopg.Connection[Any], scope: str, event_ids: Iterable[str]
) -> dict[str, JsonObject]:
    """The subset of ``event_ids`` already recorded for ``scope``, with their results."""
    ids = list(event_ids)
    if not ids:
        return {}
    rows = conn.execute(_PROCESSED, [scope, ids]).fetchall()
    return {str(event_id): dict(result) for event_id, result in rows}


def check_batch(writes: Sequence[Write], event_ids: Sequence[str]) -> None:
    """Reject caller mistakes: repeated event ids, writes for events not in the batch."""
    known = set(event_ids)
    if len(known) != len(event_ids):
        raise ValueError("event ids in one batch must be distinct")
    for write in writes:
        if write.event_id not in known:
            raise ValueError(f"record {write.id!r}: event {write.event_id!r} is not in the batch")


def check_rows(rows: Sequence[Row], dimension: int) -> None:
    """Raise ``InvalidWrite`` for the first row whose vector cannot be stored."""
    for row in rows:
        shape = np.shape(row.embedding)
        if shape != (dimension,):
            raise InvalidWrite.of_row(
                row, f"vector shape {shape}, collection dimension {dimension}"
            )
    if not rows:
        return
    # One vectorised pass: NaN/infinity would be rejected by pgvector mid-batch.
    finite = np.isfinite(np.stack([row.embedding for row in rows])).all(axis=1)
    if not finite.all():
        raise InvalidWrite.of_row(rows[int(np.argmin(finite))], "vector has NaN or infinity")


def write_claimed(
    conn: psycopg.Connection[Any],
    collection: Collection | None,
    writes: Sequence[Write],
    event_ids: Sequence[str],
    scope: str,
    results: Mapping[str, Mapping[str, Any]] | None = None,
) -> WriteResult:
    """Steps 1-2 of the module docstring; the caller owns the transaction (step 3).

    ``collection`` may be ``None`` only when there are no upserts (deletes against a
    collection that does not exist yet are no-ops).
    """
    claimed = _claim(conn, scope, writes, event_ids, results or {})
    duplicates = [event_id for event_id in event_ids if event_id not in claimed]
    upserted, deleted, updated = apply_writes(conn, collection, writes, claimed)
    return WriteResult(
        processed=[event_id for event_id in event_ids if event_id in claimed],
        duplicates=already_processed(conn, scope, duplicates),
        upserted=upserted,
        deleted=deleted,
        metadata_updated=updated,
    )


def apply_writes(
    conn: psycopg.Connection[Any],
    collection: Collection | None,
    writes: Sequence[Write],
    events: set[str],
) -> tuple[int, int, int]:
    """Apply ``events``' writes to ``collection``'s table (step 2); rows upserted,
    deleted and whose metadata was updated."""
    final = final_writes(writes, events)
    upserted = deleted = updated = 0
    if final.upserts:
        if collection is None:
            raise ValueError("upserts need a collection")
        upserted = _upsert(conn, collection, final.upserts)
    if collection is not None:
        if final.deletes:
            deleted = _delete(conn, collection, final.deletes)
        if final.updates:
            updated = _update_metadata(conn, collection, final.updates)
    return upserted, deleted, updated


@dataclass(frozen=True, slots=True)
class FinalWrites:
    """The last write per record id, by kind, each list sorted by id."""

    upserts: list[Row]
    deletes: list[str]
    updates: list[MetadataUpdate]


def final_writes(writes: Sequence[Write], events: set[str]) -> FinalWrites:
    """The last write per record id among ``events``' writes, sorted by id.

    Sorting gives every transaction the same row-lock order, so two workers upserting
    overlapping ids wait for each other instead of deadlocking.
    """
    last: dict[str, Write] = {}
    for write in writes:
        if write.event_id in events:
            last[write.id] = write
    ordered = [last[record_id] for record_id in sorted(last)]
    return FinalWrites(
        upserts=[w for w in ordered if isinstance(w, Row)],
        deletes=[w.id for w in ordered if isinstance(w, Delete)],
        updates=[w for w in ordered if isinstance(w, MetadataUpdate)],
    )


def event_results(
    writes: Sequence[Write], event_ids: Sequence[str], extra: Mapping[str, Mapping[str, Any]]
) -> list[JsonObject]:
    """Per event: what it asked for (before later writes in the batch superseded it)."""
    counts = {event_id: {"upserted": 0, "deleted": 0} for event_id in event_ids}
    for write in writes:
        if not isinstance(write, MetadataUpdate):
            counts[write.event_id]["upserted" if isinstance(write, Row) else "deleted"] += 1
    return [{**counts[event_id], **extra.get(event_id, {})} for event_id in event_ids]


def _claim(
    conn: psycopg.Connection[Any],
    scope: str,
    writes: Sequence[Write],
    event_ids: Sequence[str],
    extra: Mapping[str, Mapping[str, Any]],
) -> set[str]:
    # Sorted, so concurrent claimers take the unique-index locks in the same order.
    ordered = sorted(event_ids)
    return claim_events(conn, scope, ordered, event_results(writes, ordered, extra))


def record_result(
    conn: psycopg.Connection[Any], scope: str, event_id: str, result: Mapping[str, Any]
) -> None:
    """Replace the result stored with a claimed event (known only after its work)."""
    conn.execute(
        "UPDATE forge_processed_events SET result = %s WHERE scope = %s AND event_id = %s",
        [Jsonb(dict(result)), scope, event_id],
    )


def claim_events(
    conn: psycopg.Connection[Any],
    scope: str,
    event_ids: Sequence[str],
    results: Sequence[Mapping[str, Any]],
) -> set[str]:
    """Record ``event_ids`` (with their results) as processed under ``scope``; the ids
    recorded now, leaving out those recorded before."""
    params = [scope, list(event_ids), [Jsonb(dict(r)) for r in results]]
    return {row[0] for row in conn.execute(_CLAIM, params).fetchall()}


def _upsert(conn: psycopg.Connection[Any], collection: Collection, rows: list[Row]) -> int:
    matrix: Vector = np.stack([row.embedding for row in rows]).astype(np.float32, copy=False)
    with conn.cursor() as cursor:
        with cursor.copy(COPY_STAGING) as copy:
            for chunk in encode_chunks(rows, matrix):
                copy.write(chunk)
        cursor.execute(_UPSERT.format(table=sql.Identifier(collection.table)))
        upserted = cursor.rowcount
        # Emptied now, not only at the commit: the same transaction may stage the rows
        # of another version of the collection next.
        cursor.execute(f"DELETE FROM {STAGING_TABLE}")
        return upserted


def _update_metadata(
    conn: psycopg.Connection[Any], collection: Collection, updates: list[MetadataUpdate]
) -> int:
    query = _UPDATE_METADATA.format(table=sql.Identifier(collection.table))
    params = [
        [u.id for u in updates],
        [metadata_json(u.metadata, u.id, u.event_id).decode() for u in updates],
        [u.text_hash for u in updates],
        [u.model_version for u in updates],
    ]
    return conn.execute(query, params).rowcount


def _delete(conn: psycopg.Connection[Any], collection: Collection, ids: list[str]) -> int:
    query = sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(sql.Identifier(collection.table))
    return conn.execute(query, [ids]).rowcount
