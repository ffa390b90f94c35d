"""The Redis part of a backup: the streams entry by entry (ids kept), the consumer
groups with their positions and pending entries, and the keys that hold state: done
markers, routes and their epoch, dead-letter replay counts, the predictions kept for
feedback, online statistics and promotion markers. Not the embedding cache: it is an
optimisation, rebuilt as texts are embedded again.

The dump reads the groups first, then the streams, then the markers: taken while
workers run, it may hold an entry as pending (or unread) whose done marker it also
holds. Restored, that entry is delivered again and answered from its marker as a
duplicate, never applied twice.

Pending entries are restored as pending, to the consumer that held them, with their
idle time and delivery count (XCLAIM ... FORCE): that consumer is gone, so a worker
reclaims them after ``FORGE_CLAIM_MIN_IDLE_S`` and ``FORGE_MAX_DELIVERIES`` still
counts the deliveries made before the backup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from forge.backup.manifest import BackupError
from forge.backup.redis_format import (
    Group,
    HashKey,
    Header,
    Pending,
    Record,
    StreamEntry,
    StreamMeta,
    StringKey,
    from_blob,
    read_records,
    to_blob,
    write_records,
)
from forge.keys import Keys

_PAGE = 1000
_PIPELINE_COMMANDS = 500


@dataclass(slots=True)
class RedisCounts:
    """What a dump wrote or a restore put back."""

    streams: int = 0
    entries: int = 0
    groups: int = 0
    pending: int = 0
    keys: int = 0
    expired: int = 0


def server_version(client: redis.Redis) -> str:
    return str(client.info("server")["redis_version"])


def dump(client: redis.Redis, keys: Keys, path: Path) -> RedisCounts:
    """Write the Redis state of ``keys``'s deployment to ``path``."""
    counts = RedisCounts()
    with path.open("wb") as out:
        write_records(out, _counted(_records(client, keys), counts))
        out.flush()
    return counts


def _counted(records: Iterable[Record], counts: RedisCounts) -> Iterator[Record]:
    for record in records:
        _count(counts, record)
        yield record


def _records(client: redis.Redis, keys: Keys) -> Iterator[Record]:
    streams = [s for s in _streams(keys) if client.exists(s)]
    # Positions before entries, entries before markers: see the module notes.
    groups = [(g, _pending(client, g)) for s in streams for g in _groups(client, s)]
    yield Header(prefix=keys.prefix, group=keys.group, redis_version=server_version(client))
    for stream in streams:
        yield from _entries(client, stream)
        yield _stream_meta(client, stream)
    for group, pending in groups:
        yield group
        yield from pending
    last_errors = [keys.last_error(from_blob(p.key).decode(), p.id) for _, ps in groups for p in ps]
    yield from _key_records(client, _state_keys(client, keys, last_errors))


def _streams(keys: Keys) -> list[str]:
    """Every stream of every partition: input lanes, then outputs."""
    outputs = (name for s in keys.output_streams for name in keys.physical_outputs(s))
    return [*keys.input_lanes, *outputs]


def _entries(client: redis.Redis, stream: str) -> Iterator[StreamEntry]:
    start = "-"
    while True:
        page: Any = client.xrange(stream, start, "+", count=_PAGE)
        for entry_id, fields in page:
            pairs = [(to_blob(k), to_blob(v)) for k, v in fields.items()]
            yield StreamEntry(key=stream, id=entry_id.decode(), fields=pairs)
        if len(page) < _PAGE:
            return
        start = f"({page[-1][0].decode()}"


def _stream_meta(client: redis.Redis, stream: str) -> StreamMeta:
    info: dict[str, Any] = client.xinfo_stream(stream)
    deleted = info.get("max-deleted-entry-id")
    return StreamMeta(
        key=stream,
        last_id=info["last-generated-id"].decode(),
        entries_added=info.get("entries-added"),
        max_deleted_id=deleted.decode() if deleted is not None else None,
    )


def _groups(client: redis.Redis, stream: str) -> list[Group]:
    groups: Any = client.xinfo_groups(stream)
    return [
        Group(
            key=stream,
            name=to_blob(g["name"]),
            last_delivered_id=g["last-delivered-id"].decode(),
            entries_read=g.get("entries-read"),
        )
        for g in groups
    ]


def _pending(client: redis.Redis, group: Group) -> list[Pending]:
    stream, name = from_blob(group.key), from_blob(group.name)
    found: list[Pending] = []
    start = "-"
    while True:
        page: Any = client.xpending_range(stream, name, start, "+", _PAGE)
        found += [
            Pending(
                key=group.key,
                group=group.name,
                id=p["message_id"].decode(),
                consumer=to_blob(p["consumer"]),
                idle_ms=int(p["time_since_delivered"]),
                deliveries=int(p["times_delivered"]),
            )
            for p in page
        ]
        if len(page) < _PAGE:
            return found
        start = f"({page[-1]['message_id'].decode()}"


def _state_keys(client: redis.Redis, keys: Keys, extra: list[str]) -> list[bytes]:
    exact = [keys.routes_epoch]
    for part in keys.parts:
        exact += [part.dead_letter_replays, part.dead_letter_replays_total]
    patterns = [
        *(keys.done_pattern(s) for part in keys.parts for s in part.input_streams),
        keys.route_pattern,
        keys.prediction_pattern,
        keys.variant_stats_pattern,
        keys.promotion_pattern,
        keys.promotion_event_pattern,
    ]
    found = {k.encode() for k in [*exact, *extra]}
    for pattern in patterns:
        found.update(client.scan_iter(match=pattern, count=_PAGE))
    return sorted(found)


def _key_records(client: redis.Redis, names: list[bytes]) -> Iterator[Record]:
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    for start in range(0, len(names), _PIPELINE_COMMANDS):
        batch = names[start : start + _PIPELINE_COMMANDS]
        pipe = client.pipeline(transaction=False)
        for name in batch:
            pipe.type(name)
            pipe.pttl(name)
        described = pipe.execute()
        for index, name in enumerate(batch):
            kind, ttl_ms = described[2 * index], described[2 * index + 1]
            expire_at_ms = now_ms + ttl_ms if ttl_ms >= 0 else None
            record = _key_record(client, name, kind.decode(), expire_at_ms)
            if record is not None:
                yield record


def _key_record(
    client: redis.Redis, name: bytes, kind: str, expire_at_ms: int | None
) -> Record | None:
    if kind == "string":
        value: Any = client.get(name)
        if value is None:
            return None  # expired since the scan
        return StringKey(key=to_blob(name), value=to_blob(value), expire_at_ms=expire_at_ms)
    if kind == "hash":
        mapping: Any = client.hgetall(name)
        fields = [(to_blob(k), to_blob(v)) for k, v in mapping.items()]
        return HashKey(key=to_blob(name), fields=fields, expire_at_ms=expire_at_ms)
    if kind == "none":
        return None
    raise BackupError(f"Redis key {name.decode(errors='replace')} is a {kind}: Forge writes none")


# ---------------------------------------------------------------------- restore


def is_empty(client: redis.Redis, keys: Keys) -> bool:
    """Whether no key of ``keys``'s deployment exists."""
    return next(iter(client.scan_iter(match=keys.everything, count=_PAGE)), None) is None


def active_consumers(client: redis.Redis, keys: Keys, within_s: float) -> list[str]:
    """Consumers of the input streams seen within ``within_s``: workers that may be
    running (a live worker reads, or renews its leases, more often than that)."""
    found: list[str] = []
    for stream in keys.input_lanes:
        groups: Any = client.xinfo_groups(stream) if client.exists(stream) else []
        if not any(g["name"] == keys.group.encode() for g in groups):
            continue
        consumers: Any = client.xinfo_consumers(stream, keys.group)
        found += [
            f"{c['name'].decode(errors='replace')} on {keys.short(stream)}"
            for c in consumers
            if c["idle"] < within_s * 1000
        ]
    return found


def wipe(client: redis.Redis, keys: Keys) -> int:
    """Delete every key of ``keys``'s deployment (``restore --force``)."""
    deleted = 0
    batch: list[bytes] = []
    for name in client.scan_iter(match=keys.everything, count=_PAGE):
        batch.append(name)
        if len(batch) >= _PIPELINE_COMMANDS:
            deleted += _delete(client, batch)
            batch.clear()
    return deleted + _delete(client, batch)


def _delete(client: redis.Redis, names: list[bytes]) -> int:
    # One DEL a key: on a cluster the keys of one DEL must share a slot.
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.delete(name)
    return sum(int(n) for n in pipe.execute())


def restore(client: redis.Redis, keys: Keys, path: Path) -> RedisCounts:
    """Put the state in ``path`` back; the deployment's keys must not exist yet."""
    records = read_records(path)
    header = next(records)
    assert isinstance(header, Header)  # read_records checks the first line
    if (header.prefix, header.group) != (keys.prefix, keys.group):
        raise BackupError(
            f"{path} holds stream prefix {header.prefix!r} and group {header.group!r}:"
            f" set FORGE_STREAM_PREFIX and FORGE_GROUP to those to restore it"
        )
    writer = _Writer(client)
    counts = RedisCounts()
    for record in records:
        writer.apply(record)
        _count(counts, record)
    writer.flush()
    counts.expired = writer.expired
    return counts


def _count(counts: RedisCounts, record: Record) -> None:
    if isinstance(record, StreamMeta):
        counts.streams += 1
    elif isinstance(record, StreamEntry):
        counts.entries += 1
    elif isinstance(record, Group):
        counts.groups += 1
    elif isinstance(record, Pending):
        counts.pending += 1
    elif isinstance(record, StringKey | HashKey):
        counts.keys += 1


class _Writer:
    """Sends the records' commands in pipelines, flushing before each command that
    depends on the ones before it (a stream's id after its entries, a group after its
    stream, a pending entry after its group)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.pipe = client.pipeline(transaction=False)
        self.queued = 0
        self.expired = 0
        self.modern = int(server_version(client).split(".")[0]) >= 7
        seconds, micros = client.time()
        self.now_ms = seconds * 1000 + micros // 1000

    def apply(self, record: Record) -> None:
        if isinstance(record, StreamEntry):
            fields: Any = {from_blob(k): from_blob(v) for k, v in record.fields}
            self._queue(self.pipe.xadd(from_blob(record.key), fields, id=record.id))
        elif isinstance(record, StreamMeta):
            self.flush()
            self._set_stream_id(record)
        elif isinstance(record, Group):
            self.flush()
            self._create_group(record)
        elif isinstance(record, Pending):
            self.client.xclaim(
                from_blob(record.key),
                from_blob(record.group),
                from_blob(record.consumer),
                0,
                [record.id],
                idle=record.idle_ms,
                retrycount=record.deliveries,
                force=True,
                justid=True,
            )
        elif isinstance(record, StringKey | HashKey):
            self._put_key(record)

    def flush(self) -> None:
        if self.queued:
            self.pipe.execute()
            self.queued = 0

    def _queue(self, _: Any) -> None:
        self.queued += 1
        if self.queued >= _PIPELINE_COMMANDS:
            self.flush()

    def _set_stream_id(self, meta: StreamMeta) -> None:
        stream = from_blob(meta.key)
        if not self.client.exists(stream):
            # Every entry was deleted or trimmed: the stream and its ids still matter.
            self.client.xgroup_create(stream, "forge-backup-restore", "0", mkstream=True)
            self.client.xgroup_destroy(stream, "forge-backup-restore")
        args: list[Any] = [stream, meta.last_id]
        if self.modern and meta.entries_added is not None:
            args += ["ENTRIESADDED", meta.entries_added]
            if meta.max_deleted_id is not None:
                args += ["MAXDELETEDID", meta.max_deleted_id]
        command: Callable[..., Any] = self.client.execute_command
        command("XSETID", *args)

    def _create_group(self, group: Group) -> None:
        self.client.xgroup_create(
            from_blob(group.key),
            from_blob(group.name),
            group.last_delivered_id,
            mkstream=True,
            entries_read=group.entries_read if self.modern else None,
        )

    def _put_key(self, record: StringKey | HashKey) -> None:
        if record.expire_at_ms is not None and record.expire_at_ms <= self.now_ms:
            self.expired += 1  # it would have expired by now had there been no restore
            return
        name = from_blob(record.key)
        if isinstance(record, StringKey):
            self._queue(self.pipe.set(name, from_blob(record.value), pxat=record.expire_at_ms))
            return
        mapping: Any = {from_blob(k): from_blob(v) for k, v in record.fields}
        if mapping:
            self._queue(self.pipe.hset(name, mapping=mapping))
        if record.expire_at_ms is not None:
            self._queue(self.pipe.pexpireat(name, record.expire_at_ms))
