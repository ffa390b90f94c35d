"""The new-data handler end to end: real Redis, real PostgreSQL with pgvector, real model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from consumers.new_data import NewDataHandler
from forge.embedding.cache import EmbeddingCache
from forge.embedding.model import Embedder
from forge.embedding.model_cache import ModelCache
from forge.embedding.search import Searcher
from forge.embedding.service import EmbeddingService
from forge.events import NewData
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, HandlerSpec
from forge.runtime.worker import Worker
from forge.vectorstore import VectorStore
from tests.support.events import publish
from tests.support.metrics import sample
from tests.support.redis_helpers import TEST_REDIS_URL, running, wait_for
from tests.support.workers import completions, dead_letters, make_worker, pending

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = json.loads((REPO / "examples" / "new-data.json").read_text())


def embedding_service(ctx: Context, embedder: Embedder) -> EmbeddingService:
    models = ModelCache.from_settings(ctx.settings)
    models.get_or_load(f"embedder:{embedder.name}", lambda: embedder, lambda e: e.size_bytes)
    cache = EmbeddingCache.from_settings(ctx.redis, ctx.settings)
    return EmbeddingService(ctx.settings, models, cache, ctx.metrics)


@pytest.fixture
def collection(vector_store: VectorStore, collection_name: str) -> str:
    return collection_name


@pytest.fixture
def service(ctx: Context, embedder: Embedder) -> EmbeddingService:
    return embedding_service(ctx, embedder)


def build_worker(ctx: Context, vector_store: VectorStore, service: EmbeddingService) -> Worker:
    handler = NewDataHandler(ctx.settings, lambda: vector_store, service)
    return make_worker(ctx, handler)


@pytest.fixture
def worker(
    ctx: Context, vector_store: VectorStore, service: EmbeddingService
) -> Callable[[], Worker]:
    """Makes a fresh worker (a stopped worker does not start again)."""
    return lambda: build_worker(ctx, vector_store, service)


def event(event_id: str, collection: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "new-data", "id": event_id, "collection": collection, "records": records}


def run_until(
    make: Callable[[], Worker], ctx: Context, n_completions: int, timeout_s: float = 30
) -> None:
    worker = make()
    worker.ctx.broker.ensure_groups(worker.streams)
    with running(worker):
        wait_for(lambda: len(completions(ctx)) >= n_completions, timeout_s)


def by_source(ctx: Context) -> dict[str, Any]:
    return {c.source_id: c for c in completions(ctx)}


def test_paraphrases_rank_above_unrelated_text(
    ctx: Context,
    worker: Callable[[], Worker],
    vector_store: VectorStore,
    service: EmbeddingService,
    collection: str,
) -> None:
    publish(ctx.redis, ctx.keys.new_data, {**EXAMPLE, "collection": collection})
    run_until(worker, ctx, 1)
    (done,) = completions(ctx)
    assert done.status == "succeeded"
    assert done.result["upserted"] == 6
    assert done.result["model"] == "all-MiniLM-L6-v2"
    hits = Searcher(vector_store, service).search(
        collection, "I want my money back for a damaged item", k=6
    )
    assert {hits[0].id, hits[1].id} == {"t1", "t2"}
    assert hits[1].score > hits[-1].score + 0.2
    filtered = Searcher(vector_store, service).search(
        collection, "trouble signing in", k=3, filters={"queue": "account"}
    )
    assert [h.id for h in filtered][:1] == ["t4"]
    assert all(h.metadata["queue"] == "account" for h in filtered)


def test_the_same_event_twice_writes_each_record_once(
    ctx: Context, worker: Callable[[], Worker], vector_store: VectorStore, collection: str
) -> None:
    records = [{"id": f"r{i}", "text": f"sentence number {i}"} for i in range(5)]
    publish(ctx.redis, ctx.keys.new_data, event("e1", collection, records))
    publish(ctx.redis, ctx.keys.new_data, event("e1", collection, records))
    run_until(worker, ctx, 2)
    assert vector_store.count(collection) == 5
    first, second = completions(ctx)
    assert not first.duplicate
    assert second.duplicate
    assert second.result["upserted"] == 5


def test_cache_hits_avoid_the_model(
    ctx: Context,
    worker: Callable[[], Worker],
    service: EmbeddingService,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    texts = [{"id": f"r{i}", "text": f"cached sentence {i} {collection}"} for i in range(4)]
    publish(ctx.redis, ctx.keys.new_data, event("e1", collection, texts))
    run_until(worker, ctx, 1)
    calls: list[int] = []
    embedder = service.embedder()
    original = embedder.encode
    monkeypatch.setattr(embedder, "encode", lambda t, b: calls.append(len(t)) or original(t, b))
    again = [{**t, "id": f"copy-{t['id']}"} for t in texts]
    publish(ctx.redis, ctx.keys.new_data, event("e2", collection, again))
    run_until(worker, ctx, 2)
    result = by_source(ctx)["e2"].result
    assert result["from_cache"] == 4
    assert result["embedded"] == 0
    assert calls in ([], [0])  # the model saw no text
    hits = sample(ctx.metrics, "forge_embedding_cache_hits_total", model="all-MiniLM-L6-v2")
    assert hits == 4


def test_an_unchanged_batch_makes_no_encoder_call(
    ctx: Context,
    worker: Callable[[], Worker],
    service: EmbeddingService,
    vector_store: VectorStore,
    collection: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    texts = [{"id": f"r{i}", "text": f"unchanged sentence {i} {collection}"} for i in range(4)]
    publish(ctx.redis, ctx.keys.new_data, event("e1", collection, texts))
    run_until(worker, ctx, 1)
    ctx.redis.delete(*ctx.redis.keys(ctx.keys.embedding_cache("*", "*")))  # no cache help
    calls: list[int] = []
    embedder = service.embedder()
    original = embedder.encode
    monkeypatch.setattr(embedder, "encode", lambda t, b: calls.append(len(t)) or original(t, b))
    publish(ctx.redis, ctx.keys.new_data, event("e2", collection, texts))
    run_until(worker, ctx, 2)
    result = by_source(ctx)["e2"].result
    assert result["unchanged"] == 4
    assert (result["embedded"], result["from_cache"], result["upserted"]) == (0, 0, 0)
    assert calls == []
    stored = vector_store.fetch(collection, ["r0"])["r0"]
    assert (stored.model, stored.model_version) == ("all-MiniLM-L6-v2", embedder.version)


def test_upsert_replaces_and_delete_removes(
    ctx: Context, worker: Callable[[], Worker], vector_store: VectorStore, collection: str
) -> None:
    publish(ctx.redis, ctx.keys.new_data, event("e1", collection, [{"id": "r1", "text": "old"}]))
    publish(ctx.redis, ctx.keys.new_data, event("e2", collection, [{"id": "r1", "text": "new"}]))
    run_until(worker, ctx, 2)
    assert vector_store.fetch(collection, ["r1"])["r1"].text == "new"
    publish(ctx.redis, ctx.keys.new_data, event("e3", collection, [{"id": "r1", "deleted": True}]))
    run_until(worker, ctx, 3)
    assert vector_store.fetch(collection, ["r1"]) == {}
    assert by_source(ctx)["e3"].result["deleted"] == 1


def test_bad_events_are_dead_lettered_with_reasons_while_neighbours_succeed(
    ctx: Context, service: EmbeddingService, vector_store: VectorStore, collection: str
) -> None:
    ctx = replace(ctx, settings=ctx.settings.replace(max_text_chars=50))

    def worker() -> Worker:
        return build_worker(ctx, vector_store, service)

    good = event("good", collection, [{"id": "a", "vector": [0.1, 0.2, 0.3]}])
    cases: dict[str, bytes | dict[str, Any]] = {
        "dimension": event("dimension", collection, [{"id": "b", "vector": [0.1, 0.2]}]),
        "infinite": json.dumps(event("infinite", collection, [{"id": "c", "vector": [0]}]))
        .replace("[0]", "[1e999, 0, 0]")
        .encode(),
        "nan": json.dumps(event("nan", collection, [{"id": "d", "vector": [0]}]))
        .replace("[0]", "[NaN, 0, 0]")
        .encode(),
        "long": event("long", collection, [{"id": "e", "text": "x" * 51}]),
        "empty": event("empty", collection, [{"id": "f"}]),
        "name": event("name", "x; DROP TABLE forge_collections", [{"id": "g", "text": "t"}]),
    }
    publish(ctx.redis, ctx.keys.new_data, good)
    for payload in cases.values():
        publish(ctx.redis, ctx.keys.new_data, payload)
    run_until(worker, ctx, 1 + len(cases))
    statuses = {c.source_entry_id: c.status for c in completions(ctx)}
    assert sorted(statuses.values()).count("succeeded") == 1
    assert sorted(statuses.values()).count("dead-lettered") == len(cases)
    # Malformed JSON has no readable id: name such records by their payload's id field.
    reasons = {r.source_id or _payload_id(r.payload): r.error.message for r in dead_letters(ctx)}
    assert "dimension" in reasons["dimension"]
    assert "out of range" in reasons["infinite"]
    assert "malformed JSON" in reasons["nan"] or "NaN" in reasons["nan"]
    assert "over the limit of 50" in reasons["long"]
    assert "neither `text` nor `vector`" in reasons["empty"]
    assert "collection" in reasons["name"]
    assert vector_store.count(collection) == 1
    assert pending(ctx) == 0


def _payload_id(payload: str) -> str:
    match = re.search(r'"id":\s*"([^"]+)"', payload)
    assert match is not None
    return match.group(1)


def test_sigkill_between_commit_and_ack_leaves_one_copy(
    ctx: Context,
    service: EmbeddingService,
    vector_store: VectorStore,
    collection: str,
    pg_url: str,
) -> None:
    records = [{"id": f"r{i}", "vector": [float(i), 1.0, 0.0]} for i in range(3)]
    publish(ctx.redis, ctx.keys.new_data, event("e1", collection, records))
    env = dict(
        os.environ,
        REDIS_URL=TEST_REDIS_URL,
        POSTGRES_URL=pg_url,
        FORGE_STREAM_PREFIX=ctx.settings.stream_prefix,
        FORGE_HOME=str(ctx.settings.home_dir),
        FORGE_READ_BLOCK_S="0.05",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "forge.cli.main",
            "worker",
            "--http-port",
            "0",
            "--consumers",
            "tests.support.consumers:register_crash_after_commit",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert vector_store.count(collection) == 3  # committed
    assert pending(ctx) == 1  # never acked
    assert completions(ctx) == []

    # A worker built on the fixture's ctx would wait out its 30 s claim_min_idle_s.
    ctx = replace(ctx, settings=ctx.settings.replace(claim_min_idle_s=0.2))
    run_until(lambda: build_worker(ctx, vector_store, service), ctx, 1)
    (done,) = completions(ctx)
    assert done.status == "succeeded"
    assert done.deliveries == 2
    assert done.result["duplicate"] is True
    assert vector_store.count(collection) == 3
    assert pending(ctx) == 0


def test_a_failing_database_is_retried_then_redelivered(
    ctx: Context, service: EmbeddingService, vector_store: VectorStore, collection: str
) -> None:
    import psycopg

    failures = iter([True] * 4)

    class FlakyStore:
        def __getattr__(self, name: str) -> Any:
            if name == "write_batch" and next(failures, False):
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            return getattr(vector_store, name)

    handler = NewDataHandler(ctx.settings, FlakyStore, service)  # type: ignore[arg-type]
    registry = HandlerRegistry()
    registry.register(HandlerSpec("new-data", NewData, handler))
    publish(ctx.redis, ctx.keys.new_data, event("e1", collection, [{"id": "a", "vector": [1, 0]}]))
    run_until(lambda: Worker(ctx, registry), ctx, 1)
    (done,) = completions(ctx)
    assert done.status == "succeeded"
    assert done.deliveries == 2  # three attempts failed in-process, the redelivery worked
    assert vector_store.count(collection) == 1


def test_an_event_cannot_name_a_path_or_an_unloadable_model(
    ctx: Context, worker: Callable[[], Worker], vector_store: VectorStore
) -> None:
    records = [{"id": "a", "text": "some text"}]
    for event_id, model in (
        ("path", "/etc"),
        ("dots", "../models/x"),
        ("missing", "no-such/model"),
    ):
        payload = {**event(event_id, f"c_{event_id}_{ctx.consumer[-6:]}", records), "model": model}
        publish(ctx.redis, ctx.keys.new_data, payload)
    run_until(worker, ctx, 3)
    reasons = {r.source_id: r.error.message for r in dead_letters(ctx)}
    assert "model" in reasons["path"]
    assert "regex" in reasons["path"]
    assert "regex" in reasons["dots"]
    assert "cannot load embedding model 'no-such/model'" in reasons["missing"]
    by_id = {r.source_id: r.deliveries for r in dead_letters(ctx)}
    assert by_id["missing"] == 1  # the event's fault: not retried
