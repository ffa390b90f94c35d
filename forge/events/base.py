"""The parts every event shares: identifiers, names, timestamps and ``Event``."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

SCHEMA_VERSION = 1
EVENT_FIELD = b"event"

# Producer-chosen ids: printable, no whitespace or control characters. ``(?!\n)$``
# because ``$`` alone also matches before a trailing newline.
EventId = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x20\x7f]+(?!\n)$")]
# Collection and model names become SQL identifiers and folder names: keep them plain.
Name = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*(?!\n)$",
        description="letters, digits, '_' and '-', starting with a letter or '_'",
    ),
]
# An embedding model an event may ask for: a hub-style id ("all-MiniLM-L6-v2",
# "org/name"), never a filesystem path: events are untrusted, and loading whatever
# path they name would let any producer make a worker read its disk. Operators who
# want a local path configure it with FORGE_EMBEDDING_MODEL instead.
ModelName = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=96,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?(?!\n)$",
        description="a model id such as 'all-MiniLM-L6-v2' or 'org/name'; no paths",
    ),
]
# What msgspec's datetime decoder accepts (RFC 3339, a naive time included), so that a
# validator in any language rejects what Forge would dead-letter: many validators treat
# ``format`` as an annotation only.
Timestamp = Annotated[
    datetime,
    Meta(
        extra_json_schema={
            "format": "date-time",
            "pattern": r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[Tt ]([01]\d|2[0-3])"
            r":[0-5]\d:[0-5]\d(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):?[0-5]\d)?(?!\n)$",
        }
    ),
]
Status = Literal["succeeded", "failed", "dead-lettered"]
# What a training request may ask to export its version to.
ExportFormat = Literal["onnx"]


def utcnow() -> datetime:
    return datetime.now(UTC)


# A random (version 4, RFC 4122 variant) UUID as 32 hex digits, like ``uuid4().hex``
# at half the cost: one is made per completion, so it is on the hot path.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_id() -> str:
    return f"{int.from_bytes(os.urandom(16)) & _UUID4_CLEAR | _UUID4_SET:032x}"


class Event(msgspec.Struct, kw_only=True, tag_field="type", omit_defaults=False):
    """Fields every event has. ``created_at`` defaults to the time Redis received it."""

    id: EventId
    created_at: Timestamp | None = None
    version: int = SCHEMA_VERSION
