"""Redis Streams operations the runtime needs, and nothing else.

Forge serves Redis Streams only, so this is not a generic broker layer: it is the one
door of the runtime to Redis. Every command the worker, batch processing, settlement,
leases, the dead-letter queue and ``publish --wait`` send is a method here, so what
Forge does in Redis (which commands, which keys, what runs atomically) is read
in one module. Handlers keep their own connection (``Context.redis``) for their own
keys, such as the embedding cache; health checks and scrape-time stream stats use a
probe connection of their own (``forge.observability``).

The delivery count that decides dead-lettering is always Redis's own (XPENDING's
``times_delivered``), never one the application keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import redis

from forge.events import EVENT_FIELD, Event, encode
from forge.keys import Keys, Priority
from forge.partitioning import partition_key, partition_of
from forge.runtime.entries import Entry, Settlement, id_key, settle_call
from forge.runtime.settle_script import SETTLE_LUA
from forge.servers.lua import Script


class _Prioritized(msgspec.Struct):
    """The one field routing reads of an event of a prioritized stream."""

    priority: Priority = "normal"


# An entry id and its fields, as XRANGE and XREAD return them.
RawEntry = tuple[str, dict[bytes, bytes]]


def _decode_id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class StreamBroker:
    """Consumer-group operations on Forge's streams for one Redis connection pool."""

    def __init__(self, client: redis.Redis, keys: Keys, *, maxlen: int) -> None:
        self._client = client
        self.keys = keys
        self.maxlen = maxlen
        self._settle = Script(client, SETTLE_LUA)

    # ------------------------------------------------------------------ groups

    def ensure_groups(self, streams: Iterable[str]) -> None:
        """Create the consumer group on each stream (from its start) if missing."""
        for stream in streams:
            try:
                self._client.xgroup_create(stream, self.keys.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def join_groups(self, streams: Sequence[str], consumer: str) -> None:
        """Create the groups if missing and register ``consumer`` in each of them.

        Redis adds a consumer to a group only once an XREADGROUP returns it entries, so
        an idle worker would be missing from XINFO (``forge status``, the dashboards)
        and look dead; XGROUP CREATECONSUMER lists it from the start.
        """
        self.ensure_groups(streams)
        pipe = self._client.pipeline(transaction=False)
        for stream in streams:
            pipe.xgroup_createconsumer(stream, self.keys.group, consumer)
        pipe.execute()

    def forget_consumer(self, streams: Sequence[str], consumer: str) -> None:
        """Remove ``consumer`` from the group of each stream where it holds nothing, so
        XINFO lists only consumers that exist (or still hold entries to reclaim)."""
        for stream in streams:
            pending: Any = self._client.xpending_range(
                stream, self.keys.group, "-", "+", 1, consumername=consumer
            )
            if not pending:
                self._client.xgroup_delconsumer(stream, self.keys.group, consumer)

    # ------------------------------------------------------------------ reading

    def read(
        self, streams: Sequence[str], consumer: str, count: int, block_ms: int | None
    ) -> list[Entry]:
        """New entries for this consumer (XREADGROUP ``>``); each is a first delivery."""
        reply: Any = self._client.xreadgroup(
            self.keys.group, consumer, dict.fromkeys(streams, ">"), count=count, block=block_ms
        )
        entries: list[Entry] = []
        for stream_name, items in reply or ():
            stream = _decode_id(stream_name)
            for entry_id, fields in items:
                # A trimmed or deleted entry still pending comes back with no fields.
                entries.append(Entry(stream, _decode_id(entry_id), fields or {}))
        return entries

    def lane_heads(self, streams: Sequence[str]) -> tuple[float, dict[str, float]]:
        """Redis's clock (Unix seconds), and when the oldest entry each stream's group has
        not delivered yet arrived; a stream with none waiting is left out. What a
        worker choosing between priority lanes looks at: a read without taking."""
        # TIME on its own: a cluster pipeline takes only commands with keys.
        seconds, micros = self._client.time()
        pipe = self._client.pipeline(transaction=False)
        for stream in streams:
            pipe.xinfo_groups(stream)
        replies: list[Any] = pipe.execute(raise_on_error=False)
        positions: dict[str, str] = {}
        for stream, reply in zip(streams, replies, strict=True):
            if isinstance(reply, redis.ResponseError) and "no such key" in str(reply).lower():
                continue  # the lane was never written to, nor read
            if isinstance(reply, Exception):
                raise reply
            group = next((g for g in reply if _decode_id(g["name"]) == self.keys.group), None)
            if group is not None and group.get("lag") != 0:  # 0: Redis 7 says none waits
                positions[stream] = _decode_id(group["last-delivered-id"])
        heads: dict[str, float] = {}
        if positions:
            pipe = self._client.pipeline(transaction=False)
            for stream, position in positions.items():
                pipe.xrange(stream, min=f"({position}", count=1)
            for stream, head in zip(positions, pipe.execute(), strict=True):
                if head:
                    heads[stream] = id_key(_decode_id(head[0][0]))[0] / 1000
        return int(seconds) + int(micros) / 1_000_000, heads

    def claim_stale(self, stream: str, consumer: str, min_idle_ms: int, count: int) -> list[Entry]:
        """Take over entries whose holder has been silent for ``min_idle_ms`` (XAUTOCLAIM)."""
        reply: Any = self._client.xautoclaim(
            stream,
            self.keys.group,
            consumer,
            min_idle_time=min_idle_ms,
            start_id="0-0",
            count=count,
        )
        claimed = [(_decode_id(eid), fields or {}) for eid, fields in reply[1]]
        return self._with_delivery_counts(stream, consumer, claimed)

    def claim_own(self, stream: str, consumer: str, entry_ids: Sequence[str]) -> list[Entry]:
        """Redeliver this consumer's failed entries to itself; Redis counts a new delivery."""
        if not entry_ids:
            return []
        reply: Any = self._client.xclaim(stream, self.keys.group, consumer, 0, list(entry_ids))
        claimed = [(_decode_id(eid), fields or {}) for eid, fields in reply]
        return self._with_delivery_counts(stream, consumer, claimed)

    def _with_delivery_counts(
        self, stream: str, consumer: str, claimed: list[tuple[str, dict[bytes, bytes]]]
    ) -> list[Entry]:
        if not claimed:
            return []
        ids = [eid for eid, _ in claimed]
        pending: Any = self._client.xpending_range(
            stream,
            self.keys.group,
            min=min(ids, key=id_key),
            max=max(ids, key=id_key),
            count=len(ids) * 2 + 10,
            consumername=consumer,
        )
        counts = {_decode_id(p["message_id"]): int(p["times_delivered"]) for p in pending}
        return [Entry(stream, eid, fields, counts.get(eid, 1)) for eid, fields in claimed]

    def renew(self, stream: str, consumer: str, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of entries still being worked on, so nobody reclaims them.

        JUSTID makes XCLAIM leave the delivery count alone.
        """
        if entry_ids:
            self._client.xclaim(stream, self.keys.group, consumer, 0, list(entry_ids), justid=True)

    # ------------------------------------------------------------------ writing

    def publish(self, stream: str, event: Event) -> str:
        """XADD one event to an output stream, trimmed to about ``maxlen`` entries."""
        payload = encode(event)
        entry_id: Any = self._client.xadd(
            self.route(stream, payload),
            {EVENT_FIELD: payload},
            maxlen=self.maxlen,
            approximate=True,
        )
        return _decode_id(entry_id)

    def publish_raw(self, stream: str, payload: bytes, *, trim: bool = False) -> str:
        """XADD a payload as is (publishing to input streams, replaying dead letters);
        to a logical stream's partition by the partitioning rule."""
        maxlen = self.maxlen if trim else None
        entry_id: Any = self._client.xadd(
            self.route(stream, payload), {EVENT_FIELD: payload}, maxlen=maxlen, approximate=True
        )
        return _decode_id(entry_id)

    def route(self, stream: str, payload: bytes) -> str:
        """Where ``payload`` goes when published to ``stream``: a logical stream's
        partition by the rule (``forge.partitioning``), a partition's stream itself."""
        keys = self.keys
        if not keys.partitioned or keys.part_of(stream).partition is not None:
            return stream
        part = keys.part(partition_of(partition_key(payload), keys.partitions))
        return part.localize(stream)

    def publish_input(self, stream: str, payload: bytes) -> tuple[str, str]:
        """XADD a validated event to an input stream, untrimmed: to its partition (by
        the rule, unless ``stream`` names one), and for a prioritized stream (or any of
        its lanes) to the lane its ``priority`` names. Returns the stream it went to
        and the entry id."""
        stream = self.route(stream, payload)
        base, _ = self.keys.lane_of(stream)
        if self.keys.is_prioritized(base):
            priority = msgspec.json.decode(payload, type=_Prioritized).priority
            stream = self.keys.lane(base, priority)
        return stream, self.publish_raw(stream, payload)

    def settle(self, settlement: Settlement) -> None:
        """Publish, mark done and ack atomically: all of it happens or none of it does.

        One script call (EVALSHA) rather than a MULTI of one command per publish, write
        and ack: a batch's settlement is then one command to pack and one reply to
        parse, where the MULTI's per-command cost in the client was the largest part of
        the runtime's own cost per message.
        """
        if not settlement:
            return
        keys, args = settle_call(settlement, self.keys.group, self.maxlen)
        self._settle(keys, args)

    def acked_any(self, settlement: Settlement) -> bool:
        """Whether any entry ``settlement`` acks is no longer pending in the group.

        A connection lost after EXEC was sent leaves it unknown whether the transaction
        ran: Redis may have applied it and only the reply was lost (a server stopping
        does not send the replies of its last commands). The transaction is atomic, so
        if it ran, none of its entries is pending any more; if one is no longer pending
        it ran, or another worker took the entry over and settled it. Either way running
        it again would publish a second completion.
        """
        pipe = self._client.pipeline(transaction=False)
        for stream, ids in settlement.acks.items():
            for entry_id in ids:
                pipe.xpending_range(stream, self.keys.group, min=entry_id, max=entry_id, count=1)
        return any(not found for found in pipe.execute())

    def done_results(self, keys: Sequence[str]) -> list[bytes | None]:
        """The stored results of idempotency markers (None where not done)."""
        if not keys:
            return []
        values: Any = self._client.mget(keys)
        return list(values)

    def last_error(self, stream: str, entry_id: str) -> bytes | None:
        """The error an entry's latest failed delivery left (``Settlement.write``)."""
        value: Any = self._client.get(self.keys.last_error(stream, entry_id))
        return None if value is None else bytes(value)

    # ------------------------------------------------------------------ dead letters
    # Each takes the partition (``Keys.parts``) whose dead-letter stream it reads or
    # writes: a replay's XADD, XDEL and counters then share one slot.

    def dead_letter_depth(self, part: Keys) -> int:
        return int(self._client.xlen(part.dead_letter))

    def dead_letters(self, part: Keys, first_id: str, last_id: str, count: int) -> list[RawEntry]:
        """Dead-letter entries from ``first_id`` to ``last_id`` (XRANGE bounds: ``-``,
        ``+``, ``(`` for exclusive), oldest first, at most ``count``."""
        page: Any = self._client.xrange(part.dead_letter, min=first_id, max=last_id, count=count)
        return [(_decode_id(entry_id), fields) for entry_id, fields in page]

    def replay_dead_letter(
        self, part: Keys, entry_id: str, stream: str, payload: bytes, source_id: str
    ) -> str:
        """Publish ``payload`` back to ``stream`` (the partition's), delete the record and
        count the replay (per ``source_id`` unless empty, and in total), in one
        transaction: a record is never both replayed and kept, nor removed without
        being replayed."""
        pipe = self._client.pipeline(transaction=True)
        pipe.xadd(part.localize(stream), {EVENT_FIELD: payload})
        pipe.xdel(part.dead_letter, entry_id)
        if source_id:
            pipe.hincrby(part.dead_letter_replays, source_id, 1)
        pipe.incr(part.dead_letter_replays_total)
        new_id: bytes | str = pipe.execute()[0]
        return _decode_id(new_id)

    def delete_dead_letters(self, part: Keys, entry_ids: Sequence[str]) -> int:
        """Delete these records; how many there were."""
        if not entry_ids:
            return 0
        return int(self._client.xdel(part.dead_letter, *entry_ids))

    def delete_dead_letter_stream(self, part: Keys) -> int:
        """Delete every record: 1 if there was a stream to delete, else 0."""
        return int(self._client.delete(part.dead_letter))

    def dead_letter_replays_total(self, part: Keys) -> int:
        return int(self._client.get(part.dead_letter_replays_total) or 0)

    def dead_letter_replay_counts(self, source_ids: Sequence[str], part: Keys) -> list[int]:
        """How often each event was replayed from the partition's dead-letter stream."""
        if not source_ids:
            return []
        values = self._client.hmget(part.dead_letter_replays, list(source_ids))
        return [int(v or 0) for v in values]

    # ------------------------------------------------------------------ completions

    def newest_completion_id(self, part: Keys) -> str | None:
        """The id of the partition's newest completion, None while there is none."""
        newest: Any = self._client.xrevrange(part.completions, count=1)
        return _decode_id(newest[0][0]) if newest else None

    def completions_after(
        self, positions: Mapping[str, str], count: int, block_ms: int
    ) -> list[tuple[str, str, dict[bytes, bytes]]]:
        """Completions added after each stream's position (XREAD), waiting up to
        ``block_ms`` for one: (stream, id, fields). One XREAD per stream when
        partitioned, since one XREAD must not cross slots; the wait is then split."""
        if len(positions) > 1 and self.keys.cluster:
            wait_ms = max(block_ms // len(positions), 1)
            found: list[tuple[str, str, dict[bytes, bytes]]] = []
            for stream, position in positions.items():
                found += self.completions_after({stream: position}, count, wait_ms)
                if found:
                    break
            return found
        streams: dict[Any, Any] = dict(positions)
        reply: Any = self._client.xread(streams, count=count, block=block_ms)
        return [
            (_decode_id(stream), _decode_id(eid), fields)
            for stream, items in reply or ()
            for eid, fields in items
        ]
