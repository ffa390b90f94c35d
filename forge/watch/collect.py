"""What ``forge watch`` shows, read from Redis: the data half of the view.

Everything here is a read (XREVRANGE, XINFO, EXISTS, TIME); nothing is acknowledged or
written, so watching a production deployment cannot disturb it. Times come from the
Redis server's clock (TIME and entry ids), never the local one: the watcher may run on
a laptop whose clock is off by minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis

from forge.events import Completion, TrainingProgress
from forge.keys import Keys
from forge.observability.merged import newest
from forge.observability.status import Snapshot, snapshot
from forge.observability.training_queue import TrainingQueue, training_queue


@dataclass(frozen=True, slots=True)
class WatchOptions:
    rows: int = 15
    window_s: float = 60.0
    # A training whose latest progress is older than this is no longer shown as running
    # (its worker died, or it finished and its completion was trimmed away).
    stale_s: float = 300.0
    # Upper bound on the entries one refresh reads from a stream, so that watching a
    # busy deployment costs Redis a bounded amount of work per refresh.
    max_scan: int = 5_000


@dataclass(frozen=True, slots=True)
class CompletionRow:
    entry_id: str
    source_stream: str  # short name, e.g. new-data
    source_id: str
    status: str
    deliveries: int = 1
    handler_s: float = 0.0
    worker: str = ""
    error: str = ""
    duplicate: bool = False

    @property
    def at_s(self) -> float:
        return entry_time_s(self.entry_id)


@dataclass(frozen=True, slots=True)
class Throughput:
    """Completions counted over ``span_s`` seconds up to now.

    ``capped`` means the window held more than ``max_scan`` entries: the rate is then
    taken over the span the newest ``max_scan`` entries cover, which is still exact.
    """

    span_s: float
    count: int
    by_status: dict[str, int] = field(default_factory=dict)
    capped: bool = False

    @property
    def per_s(self) -> float:
        return self.count / self.span_s if self.span_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class TrainingRow:
    model: str
    source_id: str
    epoch: int
    epochs: int
    loss: float
    metric: float | None
    eta_s: float | None
    updated_s: float  # server time of the latest progress entry

    @property
    def fraction(self) -> float:
        return min(max(self.epoch / self.epochs, 0.0), 1.0) if self.epochs > 0 else 0.0


@dataclass(frozen=True, slots=True)
class WatchData:
    now_s: float
    group: str
    completions: list[CompletionRow]
    throughput: Throughput
    status: Snapshot
    trainings: list[TrainingRow]
    # Training requests queued in each priority lane and held by workers.
    queue: TrainingQueue = field(default_factory=TrainingQueue)


class _Brief(msgspec.Struct):
    """The few completion fields the rate and the running-training check need."""

    status: str = ""
    source_id: str | None = None  # None: the entry had no readable event id


_completion_decoder = msgspec.json.Decoder(Completion)
_brief_decoder = msgspec.json.Decoder(_Brief)
_progress_decoder = msgspec.json.Decoder(TrainingProgress)


def entry_time_s(entry_id: str) -> float:
    """When Redis appended an entry: the millisecond part of its id, in seconds."""
    return int(entry_id.split("-", 1)[0]) / 1000


def collect(client: redis.Redis, keys: Keys, options: WatchOptions) -> WatchData:
    """One consistent-enough snapshot of everything the view shows."""
    now_s = server_time_s(client)
    trainings = running_trainings(client, keys, now_s, options)
    return WatchData(
        now_s=now_s,
        group=keys.group,
        completions=latest_completions(client, keys, options.rows),
        throughput=throughput(client, keys, now_s, options),
        status=snapshot(client, keys),
        trainings=trainings,
        queue=training_queue(client, keys, options.rows),
    )


def server_time_s(client: redis.Redis) -> float:
    reply: Any = client.time()
    seconds, micros = reply
    return int(seconds) + int(micros) / 1_000_000


def _newest(
    client: redis.Redis, keys: Keys, stream: str, min_id: str, count: int
) -> list[tuple[str, bytes]]:
    """Entries of a logical stream (all its partitions) from newest back to ``min_id``:
    (entry id, ``event`` field)."""
    merged = newest(client, keys.physical_outputs(stream), min_id, count)
    return [(entry_id, payload) for entry_id, _, payload in merged]


def latest_completions(client: redis.Redis, keys: Keys, rows: int) -> list[CompletionRow]:
    """The newest ``rows`` completions, newest first."""
    return [
        _completion_row(keys, eid, payload)
        for eid, payload in _newest(client, keys, keys.completions, "-", rows)
    ]


def _completion_row(keys: Keys, entry_id: str, payload: bytes) -> CompletionRow:
    try:
        event = _completion_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        # Someone else's writes to the stream: show that they are there, not why.
        return CompletionRow(entry_id, "?", "?", "unreadable")
    error = f"{event.error.type}: {event.error.message}" if event.error else ""
    return CompletionRow(
        entry_id=entry_id,
        source_stream=keys.short(event.source_stream),
        source_id=event.source_id or "-",
        status=event.status,
        deliveries=event.deliveries,
        handler_s=event.timings.handler_s,
        worker=event.worker,
        error=error,
        duplicate=event.duplicate,
    )


def throughput(client: redis.Redis, keys: Keys, now_s: float, options: WatchOptions) -> Throughput:
    """Completions per second over the last ``window_s``, counted from entry ids."""
    start_ms = int((now_s - options.window_s) * 1000)
    entries = _newest(client, keys, keys.completions, str(max(start_ms, 0)), options.max_scan)
    by_status: dict[str, int] = {}
    for _, payload in entries:
        status = _brief(payload).status or "unreadable"
        by_status[status] = by_status.get(status, 0) + 1
    capped = len(entries) >= options.max_scan
    span_s = now_s - entry_time_s(entries[-1][0]) if capped else options.window_s
    # A capped window can end within the current millisecond: never divide by ~0.
    return Throughput(max(span_s, 0.001), len(entries), by_status, capped)


def _brief(payload: bytes) -> _Brief:
    try:
        return _brief_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _Brief()


def running_trainings(
    client: redis.Redis, keys: Keys, now_s: float, options: WatchOptions
) -> list[TrainingRow]:
    """Trainings with recent progress and no completion yet, most recently updated first."""
    latest = _latest_progress(client, keys, now_s, options)
    if not latest:
        return []
    finished = _finished(client, keys, latest, options.max_scan)
    return [row for sid, row in latest.items() if sid not in finished]


def _latest_progress(
    client: redis.Redis, keys: Keys, now_s: float, options: WatchOptions
) -> dict[str, TrainingRow]:
    start_ms = int((now_s - options.stale_s) * 1000)
    latest: dict[str, TrainingRow] = {}
    for entry_id, payload in _newest(
        client, keys, keys.training_progress, str(max(start_ms, 0)), options.max_scan
    ):
        try:
            event = _progress_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if event.source_id in latest:
            continue  # newest first: the first one seen is the latest
        latest[event.source_id] = TrainingRow(
            model=event.model,
            source_id=event.source_id,
            epoch=event.epoch,
            epochs=event.epochs,
            loss=event.loss,
            metric=event.metric,
            eta_s=event.eta_s,
            updated_s=entry_time_s(entry_id),
        )
    return latest


def _finished(
    client: redis.Redis, keys: Keys, latest: dict[str, TrainingRow], max_scan: int
) -> set[str]:
    """Source ids among ``latest`` that already have a completion.

    Two sources, because each alone can miss one: the idempotency markers (written with
    every succeeded or failed completion, but never for a dead letter), and the
    completions published since the oldest of these trainings last reported (complete
    unless more than ``max_scan`` arrived since, which the markers then cover).
    """
    ids = list(latest)
    pipe = client.pipeline(transaction=False)
    parts = keys.parts
    for sid in ids:
        # The request's partition is not known here: its marker is in one of them.
        for part in parts:
            pipe.exists(keys.done(part.training_requests, sid))
    found = pipe.execute()
    finished = {
        sid for i, sid in enumerate(ids) if any(found[i * len(parts) : (i + 1) * len(parts)])
    }
    since_ms = int(min(row.updated_s for row in latest.values()) * 1000)
    for _, payload in _newest(client, keys, keys.completions, str(since_ms), max_scan):
        source_id = _brief(payload).source_id
        if source_id in latest:
            finished.add(source_id)
    return finished
