"""What a run publishes (valid and poison events, remembered by the input entry id Redis
gave them) and the completions it reads back."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import redis

from bench._common import consumer_pid, log
from bench._workers import Workers
from forge.events import EVENT_FIELD, Completion

_completion_decoder = msgspec.json.Decoder(Completion)


@dataclass(frozen=True)
class Planned:
    """One input entry to publish; ``kind`` is ``vector``, ``text`` or a poison kind."""

    kind: str
    event_id: str | None
    fields: dict[bytes, bytes]
    collection: str = ""
    records: tuple[str, ...] = ()

    @property
    def poison(self) -> bool:
        return self.kind not in {"vector", "text"}


POISON_KINDS = (
    "malformed-json",
    "nan-vector",
    "infinite-vector",
    "wrong-dimension",
    "missing-records",
    "empty-records",
    "record-without-data",
    "empty-vector",
    "bad-collection-name",
    "unknown-type",
    "bad-event-id",
    "not-utf8",
    "no-event-field",
    "text-too-long",
)


class Workload:
    """Deterministic (seeded) events: 8-d vector records, optional text records for the
    model, and poison entries of every kind Forge must dead-letter."""

    def __init__(
        self, seed: int, vector_collection: str, dim: int, text_collection: str = ""
    ) -> None:
        self.rng = random.Random(seed)
        self.vector_collection = vector_collection
        self.text_collection = text_collection
        self.dim = dim
        self._n = 0
        self._poison = 0

    def vector_event(self) -> Planned:
        self._n += 1
        event_id = f"ev-{self._n:07d}"
        n_records = 1 + self._n % 3  # one to three records an event
        records = [
            {"id": f"{event_id}-r{i}", "vector": self._vector(), "metadata": {"i": i}}
            for i in range(n_records)
        ]
        return self._planned("vector", event_id, self.vector_collection, records)

    def text_event(self) -> Planned:
        """One short sentence for the model (a share of them repeat: cache hits)."""
        self._n += 1
        event_id = f"tx-{self._n:07d}"
        topic = self.rng.choice(["refund", "login", "shipping", "invoice", "password"])
        text = f"customer asks about {topic} number {self.rng.randrange(200)}"
        records = [{"id": f"{event_id}-r0", "text": text}]
        return self._planned("text", event_id, self.text_collection, records)

    def poison_event(self, kind: str | None = None) -> Planned:
        self._poison += 1
        kind = kind or POISON_KINDS[(self._poison - 1) % len(POISON_KINDS)]
        event_id = f"px-{self._poison:05d}"
        base: dict[str, Any] = {"type": "new-data", "id": event_id}
        base["collection"] = self.vector_collection
        good = [{"id": f"{event_id}-r0", "vector": self._vector()}]
        pad = b",0" * (self.dim - 1)

        def js(**changes: Any) -> bytes:
            return msgspec.json.encode({**base, "records": good, **changes})

        if kind == "no-event-field":  # an entry some other producer wrote
            return Planned(kind, None, {b"data": js()})
        payloads: dict[str, Callable[[], bytes]] = {
            "malformed-json": lambda: js()[:-7],
            # NaN and 1e999 are not valid JSON numbers for a float field.
            "nan-vector": lambda: js(records=[{"id": "a", "vector": [0]}]).replace(
                b"[0]", b"[NaN" + pad + b"]"
            ),
            "infinite-vector": lambda: js(records=[{"id": "a", "vector": [0]}]).replace(
                b"[0]", b"[1e999" + pad + b"]"
            ),
            # Valid JSON and schema; the collection's dimension rejects it at write time.
            "wrong-dimension": lambda: js(records=[{"id": "a", "vector": [0.5] * (self.dim + 3)}]),
            "missing-records": lambda: msgspec.json.encode(base),
            "empty-records": lambda: js(records=[]),
            "record-without-data": lambda: js(records=[{"id": "a"}]),
            "empty-vector": lambda: js(records=[{"id": "a", "vector": []}]),
            "bad-collection-name": lambda: js(collection="x; DROP TABLE forge_collections"),
            "unknown-type": lambda: js(type="no-such-type"),
            "bad-event-id": lambda: js(id=f"has space {event_id}"),
            "not-utf8": lambda: b"\xff\xfe\x00" + event_id.encode(),
            # Over the default 20,000-character limit: rejected before any model loads.
            "text-too-long": lambda: js(records=[{"id": "a", "text": "x" * 20_001}]),
        }
        return Planned(kind, event_id, {EVENT_FIELD: payloads[kind]()})

    def _vector(self) -> list[float]:
        return [round(self.rng.uniform(-1, 1), 5) for _ in range(self.dim)]

    @staticmethod
    def _planned(
        kind: str, event_id: str, collection: str, records: list[dict[str, Any]]
    ) -> Planned:
        event = {"type": "new-data", "id": event_id, "collection": collection, "records": records}
        ids = tuple(str(r["id"]) for r in records)
        return Planned(kind, event_id, {EVENT_FIELD: msgspec.json.encode(event)}, collection, ids)


class Ledger:
    """What was published, by input entry id."""

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self.client = client
        self.stream = stream
        self.entries: dict[str, Planned] = {}
        self.published_at: dict[str, float] = {}

    def publish(self, planned: Sequence[Planned]) -> None:
        """One pipeline (no MULTI) of XADDs; no MAXLEN: input streams are never trimmed."""
        if not planned:
            return
        pipe = self.client.pipeline(transaction=False)
        for item in planned:
            pipe.xadd(self.stream, item.fields)  # type: ignore[arg-type]
        now = time.time()
        for item, raw in zip(planned, pipe.execute(), strict=True):
            entry_id = raw.decode()
            self.entries[entry_id] = item
            self.published_at[entry_id] = now

    def of_kind(self, *, poison: bool) -> dict[str, Planned]:
        return {eid: p for eid, p in self.entries.items() if p.poison == poison}


class CompletionReader:
    """Follows the completions stream from the start, incrementally."""

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self.client = client
        self.stream = stream
        self.last = "-"
        self.by_entry: dict[str, list[Completion]] = {}
        self.succeeded_by: set[int] = set()  # pids of workers that completed an event
        self.count = 0

    def poll(self, page: int = 5000, max_pages: int = 100) -> int:
        """Read what is new (bounded pages per call); returns how many arrived."""
        new = 0
        for _ in range(max_pages):
            start = self.last if self.last == "-" else f"({self.last}"
            rows: Any = self.client.xrange(self.stream, min=start, max="+", count=page)
            for raw_id, fields in rows:
                completion = _completion_decoder.decode(fields[EVENT_FIELD])
                self.by_entry.setdefault(completion.source_entry_id, []).append(completion)
                if completion.status == "succeeded":
                    with contextlib.suppress(ValueError, IndexError):
                        self.succeeded_by.add(consumer_pid(completion.worker))
                self.last = raw_id.decode()
            new += len(rows)
            if len(rows) < page:
                break
        self.count += new
        return new

    def finished(self, entry_ids: Iterable[str]) -> int:
        return sum(1 for eid in entry_ids if eid in self.by_entry)


def entry_time_s(entry_id: str) -> float:
    """When Redis appended the entry: the id's millisecond part."""
    return int(entry_id.split("-", 1)[0]) / 1000


def latency_s(completion: Completion) -> float:
    """Event-to-completion: the completion's time minus the input entry's."""
    created: datetime | None = completion.created_at
    assert created is not None
    return created.timestamp() - entry_time_s(completion.source_entry_id)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def drain(
    reader: CompletionReader,
    ledger: Ledger,
    workers: Workers,
    timeout_s: float,
    progress_every_s: float = 10.0,
) -> bool:
    """Until every published entry has a completion (terminal: succeeded, failed or
    dead-lettered), or ``timeout_s``; replaces workers that die meanwhile."""
    deadline = time.monotonic() + timeout_s
    next_note = time.monotonic() + progress_every_s
    total = len(ledger.entries)
    while time.monotonic() < deadline:
        reader.poll()
        done = reader.finished(ledger.entries)
        if done >= total:
            return True
        if time.monotonic() >= next_note:
            log(f"draining: {done}/{total} entries completed")
            next_note += progress_every_s
        workers.reap()
        time.sleep(0.2)
    return False
