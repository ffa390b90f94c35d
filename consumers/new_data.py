"""The new-data handler: records become embeddings in a pgvector collection.

Per batch: reject events that break a limit, answer events already written (the
processed-events table is the idempotency record, written in the same transaction as
the rows), then per collection embed the texts and write the rows in chunks of about
``MAX_BATCH_SIZE`` records. Each chunk of whole events is one transaction, queued on
one writer thread as soon as it is embedded, so the model does not sit idle while
PostgreSQL maintains its HNSW index. An event whose rows cannot be stored (wrong
dimension, say) is rejected and the rest of its chunk is written without it.

A worker may hold several reads at once (``FORGE_EMBED_READS_IN_FLIGHT``): they take
turns in the model (``ModelTurn``), and a read hands the turn on once its last chunk is
queued, so the next read is embedded while that chunk is written. The writer commits
the chunks in turn order. A record whose write is still queued is never taken as
unchanged by a later read: that read's fingerprint query cannot see the queued row yet.

A batch that fails part-way (the database goes away, say) leaves its earlier chunks
committed; the retry finds those events in the processed-events table and answers them
with their stored results, so every event is still written exactly once.

A record whose stored row was made from the same text by the same model version is
left alone: no model call, no write (``unchanged``), or only its metadata replaced.
While the collection has a version being built (``consumers.reembed``), every write
goes to both versions, the texts embedded by both models; a write that finds the
versions changed under it (a build began, or the switch happened) fails as transient
and the batch is done again against the new ones.

A collection these events create starts without its HNSW index (``defer_index``), so
that a large first load is not slowed by maintaining it row by row; the
``IndexKeeper`` has it built once the load is over (``consumers.deferred_index``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import numpy as np

from consumers.deferred_index import Backlog, IndexKeeper
from consumers.dual_write import BuildTarget, add_building_writes
from consumers.model_turn import ModelTurn
from consumers.once import Once
from consumers.queued_writes import NotWritten, QueuedIds, QueuedWrite, raise_failed
from consumers.record_writes import Embedded, Kept, PendingEvent, add_writes, embeds, repeated_ids
from forge.embedding.model import Embedder
from forge.embedding.service import EmbeddingService
from forge.errors import InvalidEvent
from forge.events import NewData, Record
from forge.runtime.deadletter import error_info
from forge.runtime.handlers import Message, Outcome, Rejected, Succeeded
from forge.settings import Settings
from forge.vectorstore import (
    InvalidWrite,
    VectorStore,
    VersionWrites,
    text_hash,
)

PRUNE_INTERVAL_S = 3600.0
# Vectors are stored as float32; a larger value would silently become infinity.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(slots=True)
class _Chunk:
    """Whole events of one collection, written in one transaction: where they go, the
    embedding model (and its version, if it embedded any text) and the time that took."""

    scope: str
    collection: str
    model: str
    version: str | None
    events: list[PendingEvent]
    embed_s: float
    # The collection's active version the writes are for, and the one being built.
    collection_version: int | None = None
    building: BuildTarget | None = None


class NewDataHandler:
    """``backlog``: entries waiting on a stream, for ``IndexKeeper`` (none: only a
    quiet collection gets its deferred index). ``turn``: the model's turns, shared with
    the other handlers of the worker that embed (a private one by default)."""

    def __init__(
        self,
        settings: Settings,
        store: Once[VectorStore],
        embedding: EmbeddingService,
        backlog: Backlog | None = None,
        turn: ModelTurn | None = None,
    ) -> None:
        self.settings = settings
        # Opened on first use, so a worker that never sees new-data never connects.
        self.store = store
        self.embedding = embedding
        self.indexes = IndexKeeper(settings, store, backlog)
        self.turn = turn or ModelTurn()
        self._queued_ids = QueuedIds()
        self._next_prune = 0.0
        self._writer = Once(lambda: futures.ThreadPoolExecutor(1, "forge-embed-writer"))

    def __call__(self, messages: Sequence[Message[NewData]]) -> list[Outcome]:
        # Event ids are unique per input stream; the full stream name (prefix included)
        # keeps deployments that share a database apart.
        scope = messages[0].stream
        outcomes, by_collection = self._screen(scope, messages)
        writes: list[QueuedWrite] = []
        try:
            with self.turn.turn():
                for collection, group in by_collection.items():
                    outcomes.update(self._queue_collection(scope, collection, group, writes))
        finally:
            # A failed embed must not leave a write running into the retry.
            futures.wait([w.future for w in writes])
            self._queued_ids.done([w.ids for w in writes])
        for write in writes:
            outcomes.update(write.future.result())
        for collection in by_collection:
            self.indexes.wrote(collection, scope)
        self._prune_markers(scope)
        return [outcomes[i] for i in range(len(messages))]

    def _screen(
        self, scope: str, messages: Sequence[Message[NewData]]
    ) -> tuple[dict[int, Outcome], dict[str, list[PendingEvent]]]:
        """Answer the events already written and reject those over a limit; the rest,
        by collection."""
        outcomes: dict[int, Outcome] = {}
        by_collection: dict[str, list[PendingEvent]] = {}
        done = self.store().already_processed(scope, [m.event.id for m in messages])
        for index, message in enumerate(messages):
            event = message.event
            if event.id in done:
                outcomes[index] = Succeeded({**done[event.id], "duplicate": True})
                continue
            try:
                self._check_limits(event)
            except InvalidEvent as exc:
                outcomes[index] = Rejected(error_info(exc))
                continue
            by_collection.setdefault(event.collection, []).append(PendingEvent(index, event))
        return outcomes, by_collection

    def _prune_markers(self, scope: str) -> None:
        """Forget processed-event markers older than the idempotency window, hourly,
        so the table stays the size of that window."""
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_INTERVAL_S
        self.store().prune_processed(self.settings.idempotency_ttl_s, scope)

    # ------------------------------------------------------------------ validation

    def _check_limits(self, event: NewData) -> None:
        limit = self.settings.max_records_per_event
        if len(event.records) > limit:
            raise InvalidEvent(f"{len(event.records)} records, over the limit of {limit}")
        for record in event.records:
            _check_record(record, self.settings.max_text_chars)

    # ------------------------------------------------------------------ writing

    def _queue_collection(
        self, scope: str, collection: str, pending: list[PendingEvent], writes: list[QueuedWrite]
    ) -> dict[int, Outcome]:
        """Embed the collection's events chunk by chunk, queueing each chunk's write as
        soon as it is ready (``writes``); the events rejected before any write."""
        model = self.embedding.model_for(self.store(), collection, pending[0].event.model)
        outcomes = _reject_other_models(collection, model, pending)
        active = self.store().collection(collection)
        building = self._build_target(collection) if active is not None else None
        if building is not None:
            outcomes.update(_reject_ready_vectors(collection, building.version, pending))
        repeated = repeated_ids(pending) | self._queued_ids.of(collection)
        active_version = active.version if active is not None else None
        for events in _chunks(pending, self.settings.max_batch_size):
            raise_failed(w.future for w in writes)  # the database is gone, say: stop embedding
            started = time.perf_counter()
            version = self._prepare_writes(events, model, repeated)
            if building is not None:
                add_building_writes(events, building, self.embedding)
            embed_s = time.perf_counter() - started
            chunk = _Chunk(
                scope, collection, model, version, events, embed_s, active_version, building
            )
            ids = self._queued_ids.add(collection, events)
            before = writes[-1].future if writes else None
            writes.append(QueuedWrite(self._writer().submit(self._write_after, before, chunk), ids))
        return outcomes

    def _write_after(
        self, before: futures.Future[dict[int, Outcome]] | None, chunk: _Chunk
    ) -> dict[int, Outcome]:
        """Write ``chunk`` unless the read's chunk before it failed: the retry writes them
        both again, in the read's order, so a later chunk's rows (an update of a record,
        say) are never committed under an earlier chunk's."""
        if before is not None and before.exception() is not None:
            raise NotWritten("an earlier chunk of the read failed")
        return self._write_chunk(chunk)

    def _build_target(self, collection: str) -> BuildTarget | None:
        found = self.store().versions.building(collection)
        if found is None or found.model is None:
            return None
        return BuildTarget(found.version, self.embedding.embedder(found.model))

    def _write_chunk(self, chunk: _Chunk) -> dict[int, Outcome]:
        """Write one chunk in one transaction, leaving out events whose rows are bad."""
        outcomes: dict[int, Outcome] = {}
        started = time.perf_counter()
        raced: dict[str, dict[str, Any]] = {}
        pending = chunk.events
        while pending:
            try:
                raced = self._write(chunk)
                break
            except InvalidWrite as exc:
                bad = next(p for p in pending if p.event.id == exc.event_id)
                outcomes[bad.index] = Rejected(error_info(exc))
                pending.remove(bad)
        write_s = time.perf_counter() - started
        timings = {"embed_s": round(chunk.embed_s, 6), "write_s": round(write_s, 6)}
        for item in pending:
            if item.event.id in raced:  # another worker wrote it first; report its result
                outcomes[item.index] = Succeeded({**raced[item.event.id], "duplicate": True})
            else:
                outcomes[item.index] = Succeeded({**item.result, **timings})
        return outcomes

    def _prepare_writes(
        self, pending: list[PendingEvent], model: str, repeated: set[str]
    ) -> str | None:
        """Build every event's writes, embedding all the changed texts of the batch at
        once; records whose stored row the model would remake are left as they are."""
        embeddable = [r for item in pending for r in item.event.records if embeds(r)]
        if not embeddable:
            add_writes(pending, Embedded(model, None, {}))
            return None
        embedder = self.embedding.embedder(model)
        kept = self._unchanged(pending[0].event.collection, embeddable, embedder, repeated)
        texts = [r.text for r in embeddable if r.id not in kept and r.text is not None]
        embedded = Embedded(model, embedder.version, kept)
        if texts:
            encoded = self.embedding.encode(embedder, texts)
            embedded.vectors, embedded.cached = list(encoded.vectors), encoded.cached
        add_writes(pending, embedded)
        return embedder.version

    def _unchanged(
        self,
        collection: str,
        records: list[Record],
        embedder: Embedder,
        repeated: set[str],
    ) -> dict[str, Kept]:
        """The records whose stored row was made from the same text by the same model
        version, with their text hash and stored fingerprint. A record id written more
        than once in the batch is never among them: an earlier write of the batch may
        change the row after this read."""
        hashes = {
            r.id: text_hash(r.text) for r in records if r.id not in repeated and r.text is not None
        }
        stored = self.store().fingerprints(collection, hashes)
        return {
            record_id: Kept(hashes[record_id], embedder.version, found.metadata)
            for record_id, found in stored.items()
            if found.matches(hashes[record_id], embedder.name, embedder.version)
        }

    def _write(self, chunk: _Chunk) -> dict[str, dict[str, Any]]:
        """Write the chunk in one transaction; returns events a racing worker wrote first."""
        for item in chunk.events:
            item.model, item.model_version = chunk.model, chunk.version
        building = None
        if chunk.building is not None:
            writes = [w for item in chunk.events for w in item.building_writes]
            building = VersionWrites(chunk.building.version, writes)
        result = self.store().write_batch(
            chunk.collection,
            [w for item in chunk.events for w in item.writes],
            [item.event.id for item in chunk.events],
            chunk.scope,
            model=chunk.model,
            results={item.event.id: item.result for item in chunk.events},
            version=chunk.collection_version,
            building=building,
            defer_index=self.settings.bulk_load_rows > 0,
        )
        return result.duplicates


def _reject_ready_vectors(
    collection: str, version: int, pending: list[PendingEvent]
) -> dict[int, Outcome]:
    """Take the events with ready vectors out of ``pending``: the version being built
    holds only vectors its model made. Their rejections (replayable from the dead
    letters once the new version is active)."""
    outcomes: dict[int, Outcome] = {}
    for item in list(pending):
        if any(r.vector is not None for r in item.event.records):
            message = (
                f"collection {collection!r} is being re-embedded (version {version}):"
                " ready vectors are refused until the switch"
            )
            outcomes[item.index] = Rejected(error_info(InvalidEvent(message)))
            pending.remove(item)
    return outcomes


def _reject_other_models(
    collection: str, model: str, pending: list[PendingEvent]
) -> dict[int, Outcome]:
    """Take the events that name another model than the collection's out of
    ``pending``; their rejections."""
    outcomes: dict[int, Outcome] = {}
    for item in list(pending):
        if item.event.model and item.event.model != model:
            message = f"collection {collection!r} uses model {model!r}, not {item.event.model!r}"
            outcomes[item.index] = Rejected(error_info(InvalidEvent(message)))
            pending.remove(item)
    return outcomes


def _chunks(pending: list[PendingEvent], records_per_chunk: int) -> Iterator[list[PendingEvent]]:
    """Consecutive runs of whole events with about ``records_per_chunk`` records each
    (an event is never split: its rows and its marker commit together)."""
    chunk: list[PendingEvent] = []
    size = 0
    for item in pending:
        records = max(len(item.event.records), 1)
        if chunk and size + records > records_per_chunk:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += records
    if chunk:
        yield chunk


def _check_record(record: Record, max_text_chars: int) -> None:
    if record.text is not None and len(record.text) > max_text_chars:
        raise InvalidEvent(
            f"record {record.id!r}: text of {len(record.text)} characters, "
            f"over the limit of {max_text_chars}"
        )
    if record.vector is not None:
        if not record.vector:
            raise InvalidEvent(f"record {record.id!r}: empty vector")
        if not all(math.isfinite(x) for x in record.vector):
            raise InvalidEvent(f"record {record.id!r}: vector has NaN or infinite values")
        if any(abs(x) > _FLOAT32_MAX for x in record.vector):
            raise InvalidEvent(f"record {record.id!r}: vector value beyond float32 range")
