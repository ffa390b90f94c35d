"""A snapshot of Forge's streams: what `forge status`, `/metrics` and `forge watch` show."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from forge.keys import Keys


@dataclass(frozen=True, slots=True)
class GroupStatus:
    name: str
    lag: int | None  # None when Redis cannot tell (entries deleted mid-stream)
    pending: int
    consumers: int
    last_delivered_id: str


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
    return StreamStatus(
        stream,
        int(length),
        [
            GroupStatus(
                name=_text(g["name"]),
                lag=None if g.get("lag") is None else int(g["lag"]),
                pending=int(g["pending"]),
                consumers=int(g["consumers"]),
                last_delivered_id=_text(g.get("last-delivered-id")),
            )
            for g in groups
        ],
    )


def snapshot(client: redis.Redis, keys: Keys, streams: Sequence[str] | None = None) -> Snapshot:
    names = list(streams or keys.input_streams)
    statuses = [stream_status(client, s) for s in names]
    replays = client.get(keys.dead_letter_replays_total)
    return Snapshot(
        streams=statuses,
        dead_letter_depth=int(client.xlen(keys.dead_letter)),
        dead_letter_replays=int(replays or 0),
    )
