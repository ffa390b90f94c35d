"""The Redis part's file format, ``redis-jsonl/1``: one JSON object per line.

Each line has a ``kind``:

- ``header``: the format and version, the key prefix and consumer group, the server;
- ``entry``: one stream entry, its id and its fields in order;
- ``stream``: after a stream's entries, its last generated id, entries added ever and
  largest deleted id (so ids never go backwards after a restore, even of a trimmed
  stream);
- ``group``: a consumer group's last delivered id and entries read;
- ``pending``: an entry delivered to a consumer and not acknowledged, with its idle
  time and delivery count;
- ``string`` and ``hash``: a plain key, with its absolute expiry (Unix ms) if any.

Redis values are bytes: one that is valid UTF-8 is written as a JSON string, any
other as ``{"base64": "..."}``. Lines come in that order (a stream's entries before
its groups, groups before their pending entries), which is the order a restore needs.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import msgspec

from forge.backup.manifest import BackupError

FORMAT = "redis-jsonl"
VERSION = 1


class Base64(msgspec.Struct, frozen=True):
    base64: str


Blob = str | Base64


def to_blob(value: bytes) -> Blob:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return Base64(base64.b64encode(value).decode("ascii"))


def from_blob(blob: Blob) -> bytes:
    return blob.encode("utf-8") if isinstance(blob, str) else base64.b64decode(blob.base64)


class Header(msgspec.Struct, frozen=True, kw_only=True, tag="header", tag_field="kind"):
    format: str = FORMAT
    version: int = VERSION
    prefix: str
    group: str
    redis_version: str


class StreamMeta(msgspec.Struct, frozen=True, kw_only=True, tag="stream", tag_field="kind"):
    key: Blob
    last_id: str
    entries_added: int | None = None
    max_deleted_id: str | None = None


class StreamEntry(msgspec.Struct, frozen=True, kw_only=True, tag="entry", tag_field="kind"):
    key: Blob
    id: str
    fields: list[tuple[Blob, Blob]]


class Group(msgspec.Struct, frozen=True, kw_only=True, tag="group", tag_field="kind"):
    key: Blob
    name: Blob
    last_delivered_id: str
    entries_read: int | None = None


class Pending(msgspec.Struct, frozen=True, kw_only=True, tag="pending", tag_field="kind"):
    key: Blob
    group: Blob
    id: str
    consumer: Blob
    idle_ms: int
    deliveries: int


class StringKey(msgspec.Struct, frozen=True, kw_only=True, tag="string", tag_field="kind"):
    key: Blob
    value: Blob
    expire_at_ms: int | None = None


class HashKey(msgspec.Struct, frozen=True, kw_only=True, tag="hash", tag_field="kind"):
    key: Blob
    fields: list[tuple[Blob, Blob]]
    expire_at_ms: int | None = None


Record = Header | StreamMeta | StreamEntry | Group | Pending | StringKey | HashKey

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Record)


def write_records(out: IO[bytes], records: Iterable[Record]) -> int:
    """Write ``records`` one per line; returns how many."""
    count = 0
    buffer = bytearray()
    for record in records:
        _encoder.encode_into(record, buffer)
        buffer.extend(b"\n")
        out.write(buffer)
        buffer.clear()
        count += 1
    return count


def read_records(path: Path) -> Iterator[Record]:
    """The records of a file, the header first; a line that is not one is an error
    naming the file and line."""
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                record = _decoder.decode(line)
            except msgspec.DecodeError as exc:
                raise BackupError(f"{path}:{number}: not a {FORMAT} record: {exc}") from None
            if number == 1:
                _check_header(path, record)
            yield record


def _check_header(path: Path, record: Record) -> None:
    if not isinstance(record, Header) or record.format != FORMAT:
        raise BackupError(f"{path} does not start with a {FORMAT} header")
    if record.version > VERSION:
        raise BackupError(
            f"{path} is {FORMAT} version {record.version}; this Forge reads up to {VERSION}"
        )
