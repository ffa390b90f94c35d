"""The new-data handler: records become embeddings in a pgvector collection.

Per batch: reject events that break a limit, answer events already written (the
processed-events table is the idempotency record, written in the same transaction as
the rows), then per collection embed the texts and write the rows in chunks of about
``MAX_BATCH_SIZE`` records. Each chunk of whole events is one transaction, written on a
writer thread while the next chunk is embedded, so the model does not sit idle while
PostgreSQL maintains its HNSW index. An event whose rows cannot be stored (wrong
dimension, say) is rejected and the rest of its chunk is written without it.

A batch that fails part-way (the database goes away, say) leaves its earlier chunks
committed; the retry finds those events in the processed-events table and answers them
with their stored results, so every event is still written exactly once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from consumers.once import Once
from forge.embedding.model import Embedder
from forge.embedding.service import EmbeddingService
from forge.errors import InvalidEvent
from forge.events import NewData, Record
from forge.runtime.deadletter import error_info
from forge.runtime.handlers import Message, Outcome, Rejected, Succeeded
from forge.settings import Settings
from forge.vectorstore import (
    Delete,
    InvalidWrite,
    MetadataUpdate,
    Row,
    VectorStore,
    Write,
    text_hash,
)

PRUNE_INTERVAL_S = 3600.0
# Vectors are stored as float32; a larger value would silently become infinity.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(slots=True)
class _PendingEvent:
    """An event of a collection's batch on its way to the store: its writes, and what
    its result reports about them."""

    index: int
    event: NewData
    writes: list[Write] = field(default_factory=list)
    from_cache: int = 0
    embedded: int = 0
    unchanged: int = 0
    model: str | None = None
    model_version: str | None = None

    @property
    def result(self) -> dict[str, Any]:
        return {
            "collection": self.event.collection,
            "records": len(self.event.records),
            "upserted": sum(isinstance(w, Row) for w in self.writes),
            "deleted": sum(isinstance(w, Delete) for w in self.writes),
            "metadata_updated": sum(isinstance(w, MetadataUpdate) for w in self.writes),
            "unchanged": self.unchanged,
            "from_cache": self.from_cache,
            "embedded": self.embedded,
            "model": self.model,
            "model_version": self.model_version,
        }


@dataclass(slots=True)
class _Chunk:
    """Whole events of one collection, written in one transaction: where they go, the
    embedding model (and its version, if it embedded any text) and the time that took."""

    scope: str
    collection: str
    model: str
    version: str | None
    events: list[_PendingEvent]
    embed_s: float


class NewDataHandler:
    def __init__(
        self, settings: Settings, store: Once[VectorStore], embedding: EmbeddingService
    ) -> None:
        self.settings = settings
        # Opened on first use, so a worker that never sees new-data never connects.
        self.store = store
        self.embedding = embedding
        self._next_prune = 0.0
        self._writer = Once(lambda: futures.ThreadPoolExecutor(1, "forge-embed-writer"))

    def __call__(self, messages: Sequence[Message[NewData]]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        by_collection: dict[str, list[_PendingEvent]] = {}
        # Event ids are unique per input stream; the full stream name (prefix included)
        # keeps deployments that share a database apart.
        scope = messages[0].stream
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
            by_collection.setdefault(event.collection, []).append(_PendingEvent(index, event))
        for collection, group in by_collection.items():
            outcomes.update(self._write_collection(scope, collection, group))
        self._prune_markers(scope)
        return [outcomes[i] for i in range(len(messages))]

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

    def _write_collection(
        self, scope: str, collection: str, pending: list[_PendingEvent]
    ) -> dict[int, Outcome]:
        model = self.embedding.model_for(self.store(), collection, pending[0].event.model)
        outcomes = _reject_other_models(collection, model, pending)
        repeated = _repeated_ids(pending)
        chunks = list(_chunks(pending, self.settings.max_batch_size))
        writing: futures.Future[dict[int, Outcome]] | None = None
        try:
            for position, events in enumerate(chunks):
                started = time.perf_counter()
                version = self._prepare_writes(events, model, repeated)
                embed_s = time.perf_counter() - started
                if writing is not None:
                    outcomes.update(writing.result())
                    writing = None
                chunk = _Chunk(scope, collection, model, version, events, embed_s)
                if position == len(chunks) - 1:  # nothing left to overlap with
                    outcomes.update(self._write_chunk(chunk))
                else:
                    writing = self._writer().submit(self._write_chunk, chunk)
        finally:
            if writing is not None:
                # A failed embed must not leave a write running into the retry.
                futures.wait([writing])
        return outcomes

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
        self, pending: list[_PendingEvent], model: str, repeated: set[str]
    ) -> str | None:
        """Build every event's writes, embedding all the changed texts of the batch at
        once; records whose stored row the model would remake are left as they are."""
        embeddable = [r for item in pending for r in item.event.records if _embeds(r)]
        if not embeddable:
            _add_writes(pending, _Embedded(model, None, {}))
            return None
        embedder = self.embedding.embedder(model)
        kept = self._unchanged(pending[0].event.collection, embeddable, embedder, repeated)
        texts = [r.text for r in embeddable if r.id not in kept and r.text is not None]
        embedded = _Embedded(model, embedder.version, kept)
        if texts:
            encoded = self.embedding.encode(embedder, texts)
            embedded.vectors, embedded.cached = list(encoded.vectors), encoded.cached
        _add_writes(pending, embedded)
        return embedder.version

    def _unchanged(
        self,
        collection: str,
        records: list[Record],
        embedder: Embedder,
        repeated: set[str],
    ) -> dict[str, _Kept]:
        """The records whose stored row was made from the same text by the same model
        version, with their text hash and stored fingerprint. A record id written more
        than once in the batch is never among them: an earlier write of the batch may
        change the row after this read."""
        hashes = {
            r.id: text_hash(r.text) for r in records if r.id not in repeated and r.text is not None
        }
        stored = self.store().fingerprints(collection, hashes)
        return {
            record_id: _Kept(hashes[record_id], embedder.version, found.metadata)
            for record_id, found in stored.items()
            if found.matches(hashes[record_id], embedder.name, embedder.version)
        }

    def _write(self, chunk: _Chunk) -> dict[str, dict[str, Any]]:
        """Write the chunk in one transaction; returns events a racing worker wrote first."""
        for item in chunk.events:
            item.model, item.model_version = chunk.model, chunk.version
        result = self.store().write_batch(
            chunk.collection,
            [w for item in chunk.events for w in item.writes],
            [item.event.id for item in chunk.events],
            chunk.scope,
            model=chunk.model,
            results={item.event.id: item.result for item in chunk.events},
        )
        return result.duplicates


class _Kept(NamedTuple):
    """A record whose stored row stays: its text hash, the model version that made
    the row, and the metadata stored with it."""

    text_hash: str
    model_version: str
    metadata: dict[str, Any]


@dataclass(slots=True)
class _Embedded:
    """What embedding a chunk's texts gave: the model, its version (``None`` when it
    embedded nothing), the records left unchanged, and the vectors of the others in
    order with whether each came from the cache."""

    model: str
    version: str | None
    kept: dict[str, _Kept]
    vectors: list[np.ndarray[Any, Any]] = field(default_factory=list)
    cached: list[bool] = field(default_factory=list)


def _add_writes(pending: list[_PendingEvent], embedded: _Embedded) -> None:
    """Give each event its writes: a delete, a metadata update of an unchanged record
    whose metadata changed, nothing for a wholly unchanged one, else a row."""
    position = 0
    for item in pending:
        for record in item.event.records:
            if record.deleted:
                item.writes.append(Delete(record.id, item.event.id))
                continue
            if _embeds(record) and record.id in embedded.kept:
                kept = embedded.kept[record.id]
                if kept.metadata == record.metadata:
                    item.unchanged += 1
                else:
                    item.writes.append(
                        MetadataUpdate(
                            record.id,
                            item.event.id,
                            record.metadata,
                            kept.text_hash,
                            kept.model_version,
                        )
                    )
                continue
            # A row names the model that made its vector; a ready vector has none,
            # so a model trained on it is not offered texts (see training).
            made_by: str | None = None
            version: str | None = None
            if record.vector is not None:
                vector = np.asarray(record.vector, dtype=np.float32)
            else:
                vector, hit = embedded.vectors[position], embedded.cached[position]
                position += 1
                item.from_cache += hit
                item.embedded += not hit
                made_by, version = embedded.model, embedded.version
            item.writes.append(
                Row(
                    record.id,
                    vector,
                    item.event.id,
                    record.text,
                    record.metadata,
                    made_by,
                    version,
                )
            )


def _embeds(record: Record) -> bool:
    """Whether ``record`` is a text for the model to embed."""
    return not record.deleted and record.vector is None and record.text is not None


def _repeated_ids(pending: list[_PendingEvent]) -> set[str]:
    """Record ids that more than one record of the batch writes."""
    seen: set[str] = set()
    repeated: set[str] = set()
    for item in pending:
        for record in item.event.records:
            (repeated if record.id in seen else seen).add(record.id)
    return repeated


def _reject_other_models(
    collection: str, model: str, pending: list[_PendingEvent]
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


def _chunks(pending: list[_PendingEvent], records_per_chunk: int) -> Iterator[list[_PendingEvent]]:
    """Consecutive runs of whole events with about ``records_per_chunk`` records each
    (an event is never split: its rows and its marker commit together)."""
    chunk: list[_PendingEvent] = []
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
