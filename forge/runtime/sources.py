"""Where a worker's next batches come from.

In order of preference: this worker's failed entries whose redelivery is due, else
entries of dead workers (every ``reclaim_interval_s``), else new entries (XREADGROUP,
blocking). A worker holds a bounded set of entries awaiting redelivery: once it is full
(``max(4 x largest batch, 16)`` entries), it reads and reclaims nothing more until
some are retried (backpressure).

The lanes of a prioritized stream (``forge.runtime.priority``) are read one at a time,
the best lane first, so a worker takes a high-priority request before older normal
ones. A stream whose batches run beside the loop (``Room``: the trainer's slots) is
read, reclaimed and redelivered only while a slot is free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from forge.runtime.context import Context
from forge.runtime.entries import Entry
from forge.runtime.priority import lane_order

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ReadGroup:
    """Streams one XREADGROUP reads (they share a batch size); the lanes of a
    prioritized stream, highest first, when ``lanes``."""

    streams: list[str]
    count: int
    lanes: bool = False


ReadPlan = list[ReadGroup]


class Room(Protocol):
    """Whether the worker can take another batch of a stream now."""

    def has_room(self, stream: str) -> bool: ...

    def wait_for_room(self, timeout_s: float) -> None:
        """Return when a stream may have room again, or after ``timeout_s``."""


class _Unlimited:
    def has_room(self, stream: str) -> bool:
        return True

    def wait_for_room(self, timeout_s: float) -> None:
        time.sleep(timeout_s)


class BatchSource:
    """The next batches of one worker, and its entries awaiting redelivery."""

    def __init__(
        self,
        ctx: Context,
        batch_sizes: Mapping[str, int],
        stopping: threading.Event,
        room: Room | None = None,
    ) -> None:
        """``batch_sizes``: the most entries one batch of each stream (full name) holds.
        Nothing is read or reclaimed once ``stopping`` is set, nor for a stream while
        ``room`` says it has none."""
        # Public so a test can shorten the reclaim threshold of a running source.
        self.settings = ctx.settings
        self._broker = ctx.broker
        self._consumer = ctx.consumer
        self._observer = ctx.observer
        self._stopping = stopping
        self._batch_sizes = dict(batch_sizes)
        # Metric labels name a prioritized stream, not its lanes, as the handler's do.
        self._labels = {s: ctx.keys.label(s) for s in batch_sizes}
        self._redeliveries: dict[str, dict[str, float]] = {s: {} for s in batch_sizes}
        self._next_reclaim = 0.0
        self._room: Room = room or _Unlimited()
        self._read_plan = plan_reads(ctx, self._batch_sizes)
        self._read_turn = 0
        largest = max(self._batch_sizes.values(), default=1)
        self._max_waiting = max(4 * largest, 16)

    def next_batches(self) -> dict[str, list[Entry]]:
        """Entries by stream, each list one batch; empty when there is nothing to do."""
        entries = self._due_redeliveries() or self._reclaim() or self._read()
        batches: dict[str, list[Entry]] = {}
        for entry in entries:
            batches.setdefault(entry.stream, []).append(entry)
        return batches

    def schedule_redelivery(self, stream: str, failed: Sequence[Entry]) -> None:
        """Redeliver these entries of ``stream`` later, a little later with each failure."""
        due = self._redeliveries[stream]
        for entry in failed:
            delay_s = self.settings.redeliver_delay_s * (2 ** (entry.deliveries - 1))
            due[entry.entry_id] = time.monotonic() + delay_s

    # ------------------------------------------------------------------ redeliveries

    def _due_redeliveries(self) -> list[Entry]:
        now = time.monotonic()
        for stream, due in self._redeliveries.items():
            if not self._room.has_room(stream):
                continue
            ready = [eid for eid, at in due.items() if at <= now][: self._batch_sizes[stream]]
            if ready:
                for eid in ready:
                    del due[eid]
                return self._broker.claim_own(stream, self._consumer, ready)
        return []

    def _backlogged(self) -> bool:
        """As many entries await redelivery as a worker may hold."""
        return sum(len(d) for d in self._redeliveries.values()) >= self._max_waiting

    def _time_to_next_redelivery_s(self) -> float:
        times = [at for due in self._redeliveries.values() for at in due.values()]
        if not times:
            return self.settings.read_block_s
        return max(min(times) - time.monotonic(), 0.001)

    # ------------------------------------------------------------------ reclaims

    def _reclaim(self) -> list[Entry]:
        now = time.monotonic()
        # Reclaimed entries count against the backlog like read ones: a worker whose
        # reclaims keep failing must not pile up other workers' entries without bound.
        if now < self._next_reclaim or self._stopping.is_set() or self._backlogged():
            return []
        self._next_reclaim = now + self.settings.reclaim_interval_s
        min_idle_ms = int(self.settings.claim_min_idle_s * 1000)
        for stream, count in self._batch_sizes.items():
            if not self._room.has_room(stream):
                continue
            claimed = self._broker.claim_stale(stream, self._consumer, min_idle_ms, count)
            if claimed:
                self._observer.reclaimed(self._labels[stream], len(claimed))
                log.info("reclaimed entries of a silent worker", stream=stream, count=len(claimed))
                return claimed
        return []

    # ------------------------------------------------------------------ reads

    def _read(self) -> list[Entry]:
        if self._stopping.is_set():
            return []
        if self._backlogged():
            # Backpressure: hold no more unacknowledged entries until these are retried.
            time.sleep(min(self._time_to_next_redelivery_s(), self.settings.read_block_s))
            return []
        block_s = min(self.settings.read_block_s, self._time_to_next_redelivery_s())
        plan = [g for g in self._read_plan if all(self._room.has_room(s) for s in g.streams)]
        if not plan:  # every stream's slots are busy: wait for one to free up
            self._room.wait_for_room(block_s)
            return []
        entries = self._read_groups(plan, max(int(block_s * 1000 / len(plan)), 1))
        counts: dict[str, int] = {}
        for entry in entries:
            counts[entry.stream] = counts.get(entry.stream, 0) + 1
        for stream, count in counts.items():
            self._observer.received(self._labels[stream], count)
        return entries

    def _read_groups(self, plan: ReadPlan, block_ms: int) -> list[Entry]:
        """Read streams grouped by batch size (a trainer takes one request at a time,
        so it must not hold 32 leased), starting with a different group each time so a
        busy stream cannot starve the others."""
        self._read_turn = (self._read_turn + 1) % len(plan)
        order = plan[self._read_turn :] + plan[: self._read_turn]
        if len(order) > 1 or order[0].lanes:
            # First without blocking: a blocking read of an idle group would make a
            # backlog in another group wait the whole block time, every other turn.
            # Lanes always: only a read without blocking can choose between them.
            for group in order:
                entries = self._read_now(group)
                if entries:
                    return entries
        for group in order:
            # Blocking on all lanes at once: whichever gets an entry first wakes us.
            entries = self._broker.read(group.streams, self._consumer, group.count, block_ms)
            if entries:
                return entries
        return []

    def _read_now(self, group: ReadGroup) -> list[Entry]:
        if not group.lanes:
            return self._broker.read(group.streams, self._consumer, group.count, None)
        now_s, heads = self._broker.lane_heads(group.streams)
        for lane in lane_order(group.streams, heads, now_s, self.settings.priority_aging_s):
            entries = self._broker.read([lane], self._consumer, group.count, None)
            if entries:
                return entries
        return []


def plan_reads(ctx: Context, batch_sizes: Mapping[str, int]) -> ReadPlan:
    """Streams grouped by partition and batch size, one XREADGROUP per group (a
    partition's streams share its slot, so one read never crosses slots); the lanes of
    each prioritized stream a group of their own."""
    keys = ctx.keys
    by_size: dict[tuple[int | None, int], list[str]] = {}
    lanes: dict[str, list[str]] = {}
    for stream, count in batch_sizes.items():
        base, _ = keys.lane_of(stream)
        if keys.is_prioritized(base):
            lanes.setdefault(base, []).append(stream)
        else:
            by_size.setdefault((keys.part_of(stream).partition, count), []).append(stream)
    plan = [ReadGroup(streams, count) for (_, count), streams in by_size.items()]
    for base, present in lanes.items():
        ordered = [lane for lane in keys.lanes(base) if lane in present]
        plan.append(ReadGroup(ordered, max(batch_sizes[s] for s in ordered), lanes=True))
    return plan
