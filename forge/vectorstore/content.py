"""What stored rows were made from: text hashes and embedding model versions.

Each row records a SHA-256 of its text and the model (name and weights hash) that
embedded it, so a writer can tell an upsert that would remake the same vector from one
that changes it, and skip the model and the write for the former.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg import sql

from forge.vectorstore.types import Collection, Fingerprint

_FINGERPRINTS = "SELECT id, text_hash, model, model_version, metadata FROM {} WHERE id = ANY(%s)"


def text_hash(text: str) -> str:
    """The hash recorded with a row made from ``text`` (hex SHA-256 of its UTF-8)."""
    return hash_bytes(text.encode("utf-8"))


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprints(
    conn: psycopg.Connection[Any], collection: Collection, ids: Iterable[str]
) -> dict[str, Fingerprint]:
    """The fingerprints of those of ``ids`` stored in ``collection``."""
    wanted = list(ids)
    if not wanted:
        return {}
    query = sql.SQL(_FINGERPRINTS).format(sql.Identifier(collection.table))
    rows = conn.execute(query, [wanted]).fetchall()
    return {r[0]: Fingerprint(r[1], r[2], r[3], r[4]) for r in rows}
