"""Nearest-neighbour search and record reads over one collection."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from forge.vectorstore.types import Collection, Hit, StoredRecord, Vector

# HNSW explores ``ef_search`` candidates, which caps the number of results: raise it
# for larger k, up to pgvector's maximum.
DEFAULT_EF_SEARCH = 40
_MAX_EF_SEARCH = 1000

_SEARCH = """
SELECT id, text, metadata, 1 - (embedding <=> %(query)s::{storage}) AS score
FROM {table}
{where}
ORDER BY embedding <=> %(query)s::{storage}
LIMIT %(k)s
"""


def search(
    conn: psycopg.Connection[Any],
    collection: Collection,
    vector: Vector,
    k: int,
    filters: Mapping[str, Any] | None = None,
    *,
    ef_search: int = DEFAULT_EF_SEARCH,
    iterative_scan: bool = False,
) -> list[Hit]:
    """The ``k`` records nearest to ``vector`` by cosine similarity, best first.

    ``filters`` keeps records whose metadata contains them (jsonb ``@>``). The index
    explores ``ef_search_for(k, ef_search)`` candidates. With ``iterative_scan``
    (pgvector >= 0.8) it keeps scanning until ``k`` records pass the filter instead of
    filtering only its first candidates.
    """
    where = sql.SQL("WHERE metadata @> %(filters)s") if filters else sql.SQL("")
    query = sql.SQL(_SEARCH).format(
        table=sql.Identifier(collection.table),
        where=where,
        # The column's own type, so that the index serves the ordering.
        storage=sql.SQL("halfvec" if collection.storage == "halfvec" else "vector"),
    )
    params = {"query": np.asarray(vector, dtype=np.float32), "k": k, "filters": Jsonb(filters)}
    with conn.transaction():
        candidates = ef_search_for(k, ef_search)
        conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", [str(candidates)])
        if filters and iterative_scan:
            conn.execute("SELECT set_config('hnsw.iterative_scan', 'strict_order', true)")
        rows = conn.execute(query, params).fetchall()
    return [Hit(id=r[0], score=float(r[3]), text=r[1], metadata=r[2]) for r in rows]


def ef_search_for(k: int, ef_search: int) -> int:
    """Candidates a search for ``k`` records explores: ``ef_search``, or k when larger."""
    return min(max(ef_search, k), _MAX_EF_SEARCH)


def fetch(
    conn: psycopg.Connection[Any], collection: Collection, ids: Iterable[str]
) -> dict[str, StoredRecord]:
    query = sql.SQL(
        "SELECT id, text, metadata, embedding, model, updated_at, model_version, text_hash"
        " FROM {} WHERE id = ANY(%s)"
    ).format(sql.Identifier(collection.table))
    rows = conn.execute(query, [list(ids)]).fetchall()
    return {
        r[0]: StoredRecord(r[0], r[1], r[2], _as_array(r[3]), r[4], r[5], r[6], r[7]) for r in rows
    }


def count(conn: psycopg.Connection[Any], collection: Collection) -> int:
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(collection.table))
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def _as_array(value: Any) -> Vector:
    # pgvector's loader returns its own Vector type (or an array in older versions).
    to_numpy = getattr(value, "to_numpy", None)
    data = to_numpy() if to_numpy else value
    return np.asarray(data, dtype=np.float32)
