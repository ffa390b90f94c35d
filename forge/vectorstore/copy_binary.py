"""Encodes staging rows in PostgreSQL's binary COPY format, vectors all at once.

Going through per-value dumpers costs a Python object and a byte swap per vector;
here the whole batch of vectors becomes big-endian field bytes in one numpy step,
and each row only concatenates ready-made pieces.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from forge.vectorstore.content import hash_bytes
from forge.vectorstore.types import InvalidWrite, Row, Vector

# Column order of the staging table (see ``STAGING_COLUMNS``).
STAGING_COLUMNS = ("id", "text", "metadata", "embedding", "model", "model_version", "text_hash")
_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_TRAILER = struct.pack("!h", -1)
_FIELD_COUNT = struct.pack("!h", len(STAGING_COLUMNS))
_NULL = struct.pack("!i", -1)
_JSONB_VERSION = b"\x01"
_EMPTY_JSONB = struct.pack("!i", 3) + _JSONB_VERSION + b"{}"
# Rows per chunk handed to COPY: bounds memory for large batches.
CHUNK_ROWS = 2048
# Readers decode metadata recursively (psycopg's json.loads): far deeper nesting than
# any real metadata would make every search, fetch and training read of the collection
# fail with RecursionError, so the write is refused instead.
MAX_METADATA_DEPTH = 64

_json = msgspec.json.Encoder()
_length = struct.Struct("!i")


def vector_fields(matrix: Vector) -> npt.NDArray[np.uint8]:
    """One row per vector: field length, pgvector's (dim, unused) header, big-endian floats."""
    count, dimension = matrix.shape
    header = np.frombuffer(struct.pack("!iHH", 4 + 4 * dimension, dimension, 0), dtype=np.uint8)
    fields = np.empty((count, header.size + 4 * dimension), dtype=np.uint8)
    fields[:, : header.size] = header
    fields[:, header.size :] = matrix.astype(">f4").view(np.uint8).reshape(count, -1)
    return fields


def encode_chunks(rows: Sequence[Row], matrix: Vector) -> Iterator[bytes]:
    """The COPY data for ``rows`` (``matrix[i]`` is row i's vector), in chunks."""
    fields = vector_fields(matrix)
    yield _SIGNATURE
    for start in range(0, len(rows), CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, len(rows))
        yield _encode_range(rows, fields, start, stop)
    yield _TRAILER


def _encode_range(
    rows: Sequence[Row], fields: npt.NDArray[np.uint8], start: int, stop: int
) -> bytes:
    parts: list[bytes | memoryview] = []
    append = parts.append
    block = fields[start:stop].reshape(-1).data
    width = fields.shape[1]
    for offset, row in enumerate(rows[start:stop]):
        append(_FIELD_COUNT)
        append(_text(row.id, row))
        if row.text is None:
            text_field = digest = _NULL
        else:
            data = _utf8(row.text, row)
            text_field = _length.pack(len(data)) + data
            digest = _text(hash_bytes(data), row)
        append(text_field)
        append(_jsonb(row))
        append(block[offset * width : (offset + 1) * width])
        append(_NULL if row.model is None else _text(row.model, row))
        append(_NULL if row.model_version is None else _text(row.model_version, row))
        append(digest)
    return b"".join(parts)


def _text(value: str, row: Row) -> bytes:
    data = _utf8(value, row)
    return _length.pack(len(data)) + data


def _utf8(value: str, row: Row) -> bytes:
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidWrite.of_row(row, str(exc)) from exc
    if b"\x00" in data:
        # PostgreSQL text cannot hold NUL; name the event so the caller can drop it.
        raise InvalidWrite.of_row(row, "NUL character in text")
    return data


def _jsonb(row: Row) -> bytes:
    if not row.metadata:
        return _EMPTY_JSONB
    data = metadata_json(row.metadata, row.id, row.event_id)
    return _length.pack(len(data) + 1) + _JSONB_VERSION + data


def metadata_json(metadata: Mapping[str, Any], record_id: str, event_id: str) -> bytes:
    """``metadata`` as JSON; ``InvalidWrite`` naming the record when PostgreSQL (or a
    later reader) could not take it."""
    try:
        data = _json.encode(metadata)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidWrite.of_record(record_id, event_id, f"metadata is not JSON: {exc}") from exc
    if b"\\u0000" in data:
        raise InvalidWrite.of_record(record_id, event_id, "NUL character in metadata")
    # Counting brackets is cheap and bounds the depth from above; only then walk it.
    nesting = data.count(b"[") + data.count(b"{")
    if nesting > MAX_METADATA_DEPTH and _depth(metadata) > MAX_METADATA_DEPTH:
        raise InvalidWrite.of_record(
            record_id, event_id, f"metadata nested deeper than {MAX_METADATA_DEPTH} levels"
        )
    return data


def _depth(value: object) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in item)
    return deepest
