"""Re-embedding a collection with no downtime, as events of the new-data stream.

A ``reembed`` event creates the collection's building version and plans its backfill
(in one transaction that also records the event, so it happens once); its outcome
publishes one ``reembed-batch`` event per range of record ids onto the same stream, in
the transaction that acks it. Every worker reading new-data then takes batches like
any other entry: each reads its range from the active version, embeds the texts with
the new model and writes them to the building version, exactly once (see
``forge.vectorstore.rebuild``); the last one switches the collection to it. Batches
are ordinary entries, so a worker that dies leaves its batch to be reclaimed, leases
are renewed while it runs, and each batch's completion reports the progress.

Within one read, each batch's rows are written on a writer thread while the next
batch is embedded, so the model does not wait for the new version's HNSW inserts; the
read's outcomes come back once every write has settled. Reads take turns in the model
(``ModelTurn``, shared with the new-data handler): a read queues each batch's write as
soon as it is embedded and hands the model on after its last one, so the next read is
embedded while that write runs. Ranges are disjoint, so the order of the writes does
not matter, and a failed write does not hold back the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from consumers.model_turn import ModelTurn
from consumers.once import Once
from consumers.queued_writes import raise_failed
from forge.embedding.service import EmbeddingService
from forge.errors import PermanentError
from forge.events import Event, Reembed, ReembedBatch, new_id
from forge.runtime.deadletter import error_info
from forge.runtime.handlers import Failed, Message, Outcome, Succeeded
from forge.settings import Settings
from forge.vectorstore import Row, VectorStore
from forge.vectorstore.rebuild import Plan

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _Backfill:
    """One batch's embedded rows, ready to write to the version being built."""

    event: ReembedBatch
    stream: str
    base: dict[str, Any]
    rows: list[Row]
    model: str
    model_version: str


class ReembedHandler:
    """Handles ``reembed`` and ``reembed-batch`` events."""

    def __init__(
        self,
        settings: Settings,
        store: Once[VectorStore],
        embedding: EmbeddingService,
        turn: ModelTurn | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.embedding = embedding
        self.turn = turn or ModelTurn()
        self._writer = Once(lambda: futures.ThreadPoolExecutor(1, "forge-reembed-writer"))

    def __call__(self, messages: Sequence[Message[Event]]) -> list[Outcome]:
        outcomes: list[Outcome | futures.Future[Outcome]] = []
        try:
            with self.turn.turn():
                for message in messages:
                    # The database is gone, say: stop embedding.
                    raise_failed(o for o in outcomes if isinstance(o, futures.Future))
                    if isinstance(message.event, Reembed):
                        # A plan reads the versions a queued write (a switch) may change:
                        # wait for the writer to empty, other reads' writes included.
                        self._writer().submit(lambda: None).result()
                    handled = self._handle(message)
                    if isinstance(handled, _Backfill):
                        outcomes.append(self._writer().submit(self._write_backfill, handled))
                    else:
                        outcomes.append(handled)
        finally:
            # A failed embed must not leave a write running into the retry.
            futures.wait([o for o in outcomes if isinstance(o, futures.Future)])
        return [o.result() if isinstance(o, futures.Future) else o for o in outcomes]

    def _handle(self, message: Message[Event]) -> Outcome | _Backfill:
        event = message.event
        try:
            if isinstance(event, Reembed):
                return self._begin(event, message.stream)
            if isinstance(event, ReembedBatch):
                return self._backfill(event, message.stream)
        except PermanentError as exc:
            return Failed(error_info(exc))
        raise TypeError(f"not a re-embedding event: {type(event).__name__}")

    # ------------------------------------------------------------------ planning

    def _begin(self, event: Reembed, stream: str) -> Outcome:
        store = self.store()
        done = store.already_processed(stream, [event.id])
        if event.id not in done:
            active = store.collection(event.collection)
            if active is None:
                raise PermanentError(f"collection {event.collection!r} does not exist")
            model = event.model or active.model or self.settings.embedding_model
            embedder = self.embedding.embedder(model)
            rows_per_batch = event.batch_records or self.settings.max_batch_size
            plan = store.versions.begin(
                event.collection,
                model,
                embedder.dimension,
                rows_per_batch,
                claim=(stream, event.id),
                result=_plan_result,
                storage=event.storage,
            )
            if plan is not None:
                log.info(
                    "re-embedding started",
                    collection=event.collection,
                    version=plan.version.version,
                    model=model,
                    batches=len(plan.ranges),
                )
            done = store.already_processed(stream, [event.id])
        stored = done[event.id]
        batches = _batch_events(event.collection, stored)
        result = {k: v for k, v in stored.items() if k not in ("ranges", "run")}
        return Succeeded(result, tuple((stream, batch) for batch in batches))

    # ------------------------------------------------------------------ backfill

    def _backfill(self, event: ReembedBatch, stream: str) -> Outcome | _Backfill:
        store = self.store()
        base = {
            "collection": event.collection,
            "collection_version": event.collection_version,
            "batch": event.batch,
            "batches": event.batches,
        }
        done = store.already_processed(stream, [event.id])
        if event.id in done:  # written before its worker could ack (it died, say)
            return Succeeded({**done[event.id], "duplicate": True})
        target = store.versions.get(event.collection, event.collection_version)
        if target is None or target.state != "building" or target.model is None:
            return Succeeded({**base, "abandoned": True, "rows": 0})
        records = store.versions.range_rows(event.collection, (event.start, event.stop))
        embedder = self.embedding.embedder(target.model)
        texts = [text for _, text in records]
        vectors = self.embedding.encode(embedder, texts).vectors if texts else np.zeros((0, 1))
        rows = [
            Row(record_id, vectors[i], event.id, text, {}, target.model, embedder.version)
            for i, (record_id, text) in enumerate(records)
        ]
        return _Backfill(event, stream, base, rows, target.model, embedder.version)

    def _write_backfill(self, batch: _Backfill) -> Outcome:
        try:
            return self._write_rows(batch)
        except PermanentError as exc:
            return Failed(error_info(exc))

    def _write_rows(self, batch: _Backfill) -> Outcome:
        event = batch.event
        outcome = self.store().versions.write_backfill(
            event.collection,
            event.collection_version,
            batch.rows,
            event.id,
            batch.stream,
            batch.base,
        )
        if outcome.duplicate is not None:
            return Succeeded({**outcome.duplicate, "duplicate": True})
        if outcome.switched:
            log.info(
                "re-embedding done: version active",
                collection=event.collection,
                version=event.collection_version,
            )
        return Succeeded(
            {
                **batch.base,
                "rows": outcome.rows,
                "abandoned": outcome.abandoned,
                "batches_done": outcome.batches_done,
                "switched": outcome.switched,
                "model": batch.model,
                "model_version": batch.model_version,
            }
        )


def _plan_result(plan: Plan) -> dict[str, Any]:
    """What the ``reembed`` event's completion says, and what its redelivery needs to
    publish the same batches again (``run``, ``ranges``)."""
    return {
        "collection": plan.version.collection,
        "collection_version": plan.version.version,
        "model": plan.version.model,
        "storage": plan.version.storage,
        "batches": len(plan.ranges),
        "run": new_id(),
        "ranges": [list(span) for span in plan.ranges],
    }


def _batch_events(collection: str, stored: dict[str, Any]) -> list[ReembedBatch]:
    ranges = stored["ranges"]
    return [
        ReembedBatch(
            id=f"{stored['run']}:{index}",
            collection=collection,
            collection_version=int(stored["collection_version"]),
            batch=index,
            batches=len(ranges),
            start=start,
            stop=stop,
        )
        for index, (start, stop) in enumerate(ranges)
    ]
