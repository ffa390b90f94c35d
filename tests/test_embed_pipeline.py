"""The new-data handler's chunked pipeline: each chunk of events is one transaction,
written on a writer thread while the next chunk is embedded. Real PostgreSQL with
pgvector; a stub model, so the tests control when embedding happens."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import msgspec
import numpy as np
import psycopg
import pytest

from consumers import register
from consumers.new_data import NewDataHandler
from consumers.once import Once
from forge.embedding.cache import Encoded
from forge.events import NewData
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, Message, Outcome, Rejected, Succeeded
from forge.settings import Settings
from forge.vectorstore import VectorStore

DIMENSION = 4


class StubEmbedding:
    """Stands in for ``EmbeddingService``: one-hot-ish vectors, a hook before each encode."""

    def __init__(self, before_encode: Callable[[list[str]], None] | None = None) -> None:
        self.before_encode = before_encode or (lambda texts: None)
        self.calls: list[list[str]] = []

    def model_for(self, store: VectorStore, collection: str, requested: str | None) -> str:
        return "stub-model"

    def embedder(self, name: str | None = None) -> Any:
        return SimpleNamespace(name="stub-model", version="v1")

    def encode(self, embedder: Any, texts: Sequence[str]) -> Encoded:
        self.calls.append(list(texts))
        self.before_encode(list(texts))
        vectors = np.ones((len(texts), DIMENSION), dtype=np.float32) / 2
        return Encoded(vectors, [False] * len(texts))


class RecordingStore:
    """The real store, with ``write_batch`` observed (and optionally interfered with)."""

    def __init__(self, inner: VectorStore, around_write: Callable[[int], None] | None = None):
        self.inner = inner
        self.around_write = around_write or (lambda n: None)
        self.writes: list[tuple[list[str], str]] = []

    def write_batch(
        self, collection: str, writes: Any, event_ids: Sequence[str], *a: Any, **k: Any
    ):  # type: ignore[no-untyped-def]
        self.writes.append((list(event_ids), threading.current_thread().name))
        self.around_write(len(self.writes))
        return self.inner.write_batch(collection, writes, event_ids, *a, **k)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def messages(
    collection: str, count: int, records: int = 1, first: int = 0
) -> list[Message[NewData]]:
    return [
        Message(
            msgspec.convert(
                {
                    "type": "new-data",
                    "id": f"e{i}",
                    "collection": collection,
                    "records": [
                        {"id": f"e{i}-r{j}", "text": f"text {i} {j}"} for j in range(records)
                    ],
                },
                NewData,
            ),
            stream=f"test:{collection}:new-data",
            entry_id=f"{i + 1}-0",
            deliveries=1,
        )
        for i in range(first, first + count)
    ]


def handler(store: Any, embedding: StubEmbedding, max_batch_size: int = 2) -> NewDataHandler:
    settings = Settings(max_batch_size=max_batch_size)
    return NewDataHandler(settings, Once(lambda: store), embedding)  # type: ignore[arg-type]


def results(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    assert all(isinstance(o, Succeeded) for o in outcomes), outcomes
    return [o.result for o in outcomes if isinstance(o, Succeeded)]


def test_a_batch_is_written_in_chunks_of_whole_events(
    vector_store: VectorStore, collection_name: str
) -> None:
    store = RecordingStore(vector_store)
    outcomes = handler(store, StubEmbedding(), max_batch_size=2)(messages(collection_name, 5))
    assert [r["upserted"] for r in results(outcomes)] == [1] * 5
    assert [ids for ids, _ in store.writes] == [["e0", "e1"], ["e2", "e3"], ["e4"]]
    assert vector_store.count(collection_name) == 5

    # An event is never split across transactions, even when it alone is over the size.
    store.writes.clear()
    outcomes = handler(store, StubEmbedding(), max_batch_size=4)(
        messages(collection_name + "_b", 3, records=3)
    )
    assert [ids for ids, _ in store.writes] == [["e0"], ["e1"], ["e2"]]
    assert vector_store.count(collection_name + "_b") == 9


def test_writing_a_chunk_overlaps_embedding_the_next(
    vector_store: VectorStore, collection_name: str
) -> None:
    next_embedding_started = threading.Event()
    overlapped: list[bool] = []

    def around_write(n: int) -> None:
        if n == 1:  # the first chunk's write waits for the second chunk's embedding
            overlapped.append(next_embedding_started.wait(timeout=10))

    embedding = StubEmbedding(
        lambda texts: next_embedding_started.set() if texts[0].startswith("text 2") else None
    )
    store = RecordingStore(vector_store, around_write)
    outcomes = handler(store, embedding)(messages(collection_name, 4))
    assert overlapped == [True]
    # Every chunk on the writer thread, the last one too (the next read may overlap it);
    # the handler answers once the last one is committed.
    assert all(thread.startswith("forge-embed-writer") for _, thread in store.writes)
    assert len(results(outcomes)) == 4
    assert vector_store.count(collection_name) == 4


def test_a_failed_embedding_waits_for_the_write_in_flight(
    vector_store: VectorStore, collection_name: str
) -> None:
    finished: list[float] = []

    def slow_write(n: int) -> None:
        time.sleep(0.3)
        finished.append(time.monotonic())

    def fail_second_chunk(texts: list[str]) -> None:
        if texts[0].startswith("text 2"):
            raise RuntimeError("model crashed")

    store = RecordingStore(vector_store, slow_write)
    with pytest.raises(RuntimeError, match="model crashed"):
        handler(store, StubEmbedding(fail_second_chunk))(messages(collection_name, 4))
    raised_at = time.monotonic()
    assert len(finished) == 1
    assert finished[0] <= raised_at
    assert vector_store.count(collection_name) == 2  # the first chunk committed


def test_a_retry_after_a_part_way_failure_writes_each_event_once(
    vector_store: VectorStore, collection_name: str
) -> None:
    def fail_second_write_once(n: int) -> None:
        if n == 2:
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    batch = messages(collection_name, 5)
    store = RecordingStore(vector_store, fail_second_write_once)
    handle = handler(store, StubEmbedding())
    with pytest.raises(psycopg.OperationalError):
        handle(batch)
    assert vector_store.count(collection_name) == 2

    retried = results(handle(batch))
    assert [r.get("duplicate", False) for r in retried] == [True, True, False, False, False]
    assert all(r["upserted"] == 1 for r in retried)  # stored results for the earlier chunk
    assert vector_store.count(collection_name) == 5


def test_a_bad_event_in_a_later_chunk_is_rejected_alone(
    vector_store: VectorStore, collection_name: str
) -> None:
    batch = messages(collection_name, 4)
    bad = msgspec.structs.replace(
        batch[3].event,
        records=[
            msgspec.convert({"id": "v", "vector": [1.0, 0.0]}, type(batch[3].event.records[0]))
        ],
    )
    batch[3] = Message(bad, batch[3].stream, batch[3].entry_id, 1)
    outcomes = handler(RecordingStore(vector_store), StubEmbedding())(batch)
    assert [type(o).__name__ for o in outcomes] == ["Succeeded"] * 3 + ["Rejected"]
    rejected = outcomes[3]
    assert isinstance(rejected, Rejected)
    assert "dimension" in rejected.error.message
    assert vector_store.count(collection_name) == 3


def test_new_data_reads_several_model_batches_at_once(ctx: Context) -> None:
    ctx = replace(ctx, settings=ctx.settings.replace(max_batch_size=8, embed_pipeline_depth=3))
    registry = HandlerRegistry()
    register(registry, ctx)
    assert registry.get("new-data").max_batch_size == 24
    assert registry.get("new-data").concurrency == 2  # FORGE_EMBED_READS_IN_FLIGHT
    assert registry.get("training-requests").max_batch_size == 1

    ctx = replace(ctx, settings=ctx.settings.replace(embed_reads_in_flight=1))
    registry = HandlerRegistry()
    register(registry, ctx)
    assert registry.get("new-data").concurrency == 1


def test_events_touching_one_record_are_written_in_stream_order(
    vector_store: VectorStore, collection_name: str
) -> None:
    batch = messages(collection_name, 3)
    record = type(batch[0].event.records[0])
    batch = [
        Message(
            msgspec.structs.replace(m.event, records=[record(id="x", text=f"version {i}")]),
            m.stream,
            m.entry_id,
            1,
        )
        for i, m in enumerate(batch)
    ]
    handler(RecordingStore(vector_store), StubEmbedding(), max_batch_size=1)(batch)
    assert vector_store.fetch(collection_name, ["x"])["x"].text == "version 2"


# ---------------------------------------------------------------------- across reads


def call_in_thread(handle: NewDataHandler, batch: list[Message[NewData]]) -> Callable[[], Any]:
    """Run ``handle(batch)`` on a thread of its own, as a worker's slot does; returns a
    function that joins it and gives its outcomes (or raises its error)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["outcomes"] = handle(batch)
        except BaseException as exc:  # handed to the joining test
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()

    def join() -> Any:
        thread.join(timeout=30)
        assert not thread.is_alive()
        if "error" in box:
            raise box["error"]
        return box["outcomes"]

    return join


def test_the_next_read_is_embedded_while_the_last_write_of_the_one_before_runs(
    vector_store: VectorStore, collection_name: str
) -> None:
    first_write_started = threading.Event()
    second_read_embedding = threading.Event()
    overlapped: list[bool] = []

    def around_write(n: int) -> None:
        if n == 1:  # the first read's last (only) write waits for the next read's model
            first_write_started.set()
            overlapped.append(second_read_embedding.wait(timeout=10))

    embedding = StubEmbedding(
        lambda texts: second_read_embedding.set() if texts[0].startswith("text 2") else None
    )
    store = RecordingStore(vector_store, around_write)
    handle = handler(store, embedding)
    first = call_in_thread(handle, messages(collection_name, 2))
    assert first_write_started.wait(timeout=10)
    second = call_in_thread(handle, messages(collection_name, 2, first=2))
    assert len(results(first())) == 2
    assert len(results(second())) == 2
    assert overlapped == [True]
    # One writer, fed in turn order: the reads commit in the order they had the model.
    assert [ids for ids, _ in store.writes] == [["e0", "e1"], ["e2", "e3"]]
    assert vector_store.count(collection_name) == 4


def test_a_record_queued_by_one_read_is_never_unchanged_for_the_next(
    vector_store: VectorStore, collection_name: str
) -> None:
    """The first read changes x, the second changes it back. The second's fingerprint
    query runs while the first's row is still queued, so it sees the old text: had it
    taken x as unchanged, the first read's text would be the one left stored."""
    record = type(messages(collection_name, 1)[0].event.records[0])

    def setting(batch: list[Message[NewData]], text: str) -> list[Message[NewData]]:
        return [
            Message(
                msgspec.structs.replace(m.event, records=[record(id="x", text=text)]),
                m.stream,
                m.entry_id,
                1,
            )
            for m in batch
        ]

    handle = handler(RecordingStore(vector_store), StubEmbedding())
    results(handle(setting(messages(collection_name, 1), "old")))

    first_write_started = threading.Event()
    second_read_embedded = threading.Event()

    def around_write(n: int) -> None:
        if n == 1:
            first_write_started.set()
            assert second_read_embedded.wait(timeout=10)

    embedding = StubEmbedding(
        lambda texts: second_read_embedded.set() if texts == ["old"] else None
    )
    handle = handler(RecordingStore(vector_store, around_write), embedding)
    first = call_in_thread(handle, setting(messages(collection_name, 1, first=1), "new"))
    assert first_write_started.wait(timeout=10)
    second = call_in_thread(handle, setting(messages(collection_name, 1, first=2), "old"))
    assert results(first())[0]["upserted"] == 1
    assert results(second())[0].get("unchanged", 0) == 0
    assert embedding.calls == [["new"], ["old"]]
    assert vector_store.fetch(collection_name, ["x"])["x"].text == "old"


def test_a_failed_write_leaves_the_later_chunks_of_its_read_unwritten(
    vector_store: VectorStore, collection_name: str
) -> None:
    """Chunks are queued as soon as they are embedded; once one fails, the ones queued
    after it are not written, so the retry writes them again in the read's order."""
    second_failed = threading.Event()

    def fail_second_write(n: int) -> None:
        if n == 2:
            second_failed.set()
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    def third_chunk_after_the_failure(texts: list[str]) -> None:
        if texts[0].startswith("text 4"):
            assert second_failed.wait(timeout=10)

    embedding = StubEmbedding(third_chunk_after_the_failure)
    store = RecordingStore(vector_store, fail_second_write)
    with pytest.raises(psycopg.OperationalError):
        handler(store, embedding)(messages(collection_name, 6))
    assert [ids for ids, _ in store.writes] == [["e0", "e1"], ["e2", "e3"]]
    assert vector_store.count(collection_name) == 2
