"""One view of a stream that lives in several partitions (``Keys.physical``): their
entries merged by id, which orders them by the time Redis appended them (to the
millisecond; entries of one millisecond in two partitions have no order between them).

This is how Forge's own views read the completions (``forge watch``, ``forge status``),
and the Python API for dashboards: ``newest_completions(client, keys, count)``.
"""

from __future__ import annotations

import heapq
from typing import Any

import redis

from forge.events import EVENT_FIELD
from forge.keys import Keys

# (entry id, stream it is in, its ``event`` field)
MergedEntry = tuple[str, str, bytes]


def _key(entry: MergedEntry) -> tuple[int, int]:
    ms, _, seq = entry[0].partition("-")
    return int(ms), int(seq or 0)


def newest(
    client: redis.Redis, streams: tuple[str, ...], min_id: str, count: int
) -> list[MergedEntry]:
    """At most ``count`` entries of all ``streams`` from newest back to ``min_id``,
    newest first: one XREVRANGE per stream (each in its own slot)."""
    found: list[MergedEntry] = []
    for stream in streams:
        reply: Any = client.xrevrange(stream, "+", min_id, count=count)
        for entry_id, fields in reply or ():
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            found.append((eid, stream, (fields or {}).get(EVENT_FIELD, b"")))
    return heapq.nlargest(count, found, key=_key)


def newest_completions(
    client: redis.Redis, keys: Keys, count: int, min_id: str = "-"
) -> list[MergedEntry]:
    """The newest ``count`` completions of every partition, newest first."""
    return newest(client, keys.physical_outputs(keys.completions), min_id, count)
