"""Which partition an event goes to (docs/redis-cluster.md): one rule that any client
can apply, in any language.

    key       = the event's "collection", else its "model", else its "id"
    partition = CRC-32 (IEEE, as zlib.crc32) of the key's UTF-8 bytes, modulo
                FORGE_STREAM_PARTITIONS

The rule keeps a collection's (or a model's) events together and sends a republished
event where it went before, where its idempotency marker is. Writing to any partition is
still valid: the event is processed there like anywhere else.
"""

from __future__ import annotations

import zlib

import msgspec


class _Routed(msgspec.Struct):
    """The fields the rule reads; anything else in the event is ignored."""

    id: str | None = None
    collection: str | None = None
    model: str | None = None


def partition_key(payload: bytes) -> str:
    """The text the rule hashes; empty for a payload that is not a JSON object with
    any of the fields (it is invalid anyway, and goes to partition 0 to be dead-lettered)."""
    try:
        routed = msgspec.json.decode(payload, type=_Routed)
    except msgspec.DecodeError:
        return ""
    return routed.collection or routed.model or routed.id or ""


def partition_of(key: str, partitions: int) -> int:
    """The partition of ``key`` among ``partitions``."""
    return zlib.crc32(key.encode()) % partitions if partitions > 1 else 0
