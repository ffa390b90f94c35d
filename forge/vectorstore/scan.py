"""Whole-collection reads and metadata patches, for training rather than search.

Training wants every row (or a chosen set) as one matrix, and writes derived labels
(cluster numbers) back into the rows' metadata without touching their vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from forge.vectorstore.types import Collection, JsonObject, Snapshot

# Rows fetched per round trip: bounds the client's buffer, not the result.
_FETCH_ROWS = 10_000

_MERGE = """
UPDATE {table} AS t SET metadata = t.metadata || u.patch
FROM unnest(%s::text[], %s::jsonb[]) AS u(id, patch)
WHERE t.id = u.id
"""


def load_rows(
    conn: psycopg.Connection[Any], collection: Collection, ids: Sequence[str] | None = None
) -> Snapshot:
    """The collection's rows ordered by id (all of them, or those in ``ids``)."""
    where = sql.SQL("WHERE id = ANY(%s)") if ids is not None else sql.SQL("")
    query = sql.SQL(
        "SELECT id, metadata, embedding, model FROM {table} {where} ORDER BY id"
    ).format(table=sql.Identifier(collection.table), where=where)
    row_ids: list[str] = []
    metadata: list[JsonObject] = []
    vectors: list[np.ndarray[Any, Any]] = []
    models: list[str | None] = []
    # Binary results: pgvector's binary loader skips parsing each vector's text form.
    with conn.cursor(binary=True) as cursor:
        cursor.execute(query, [list(ids)] if ids is not None else None)
        while batch := cursor.fetchmany(_FETCH_ROWS):
            for record_id, meta, embedding, model in batch:
                row_ids.append(record_id)
                metadata.append(meta)
                vectors.append(embedding.to_numpy())
                models.append(model)
    matrix = (
        np.stack(vectors).astype(np.float32, copy=False)
        if vectors
        else np.zeros((0, collection.dimension), dtype=np.float32)
    )
    return Snapshot(ids=row_ids, vectors=matrix, metadata=metadata, models=models)


def merge_metadata(
    conn: psycopg.Connection[Any], collection: Collection, patches: Mapping[str, JsonObject]
) -> int:
    """Merge ``patches[id]`` into each row's metadata (keys replaced, others kept);
    returns how many rows exist to be patched. Ids are sorted so concurrent patchers
    lock rows in the same order."""
    if not patches:
        return 0
    ids = sorted(patches)
    query = sql.SQL(_MERGE).format(table=sql.Identifier(collection.table))
    with conn.transaction():
        return conn.execute(query, [ids, [Jsonb(patches[i]) for i in ids]]).rowcount
