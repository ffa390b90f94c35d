"""Deferred HNSW indexes: collections created by new-data events start without their
index, which one worker builds once when the first load is over. Real PostgreSQL
(pgvector) and Redis; ready vectors, so no model runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql

from consumers.deferred_index import IndexKeeper, stream_backlog
from consumers.new_data import NewDataHandler
from forge.embedding.model_cache import ModelCache
from forge.embedding.service import EmbeddingService
from forge.errors import PermanentError
from forge.runtime.context import Context
from forge.settings import Settings
from forge.vectorstore import Row, VectorStore, bulk, table_name
from forge.vectorstore.catalog import index_state
from tests.support.events import publish
from tests.support.redis_helpers import running, wait_for
from tests.support.workers import completions, make_worker

pytestmark = pytest.mark.postgres

DIM = 8
QUIET_S = 30.0


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    matrix = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    normed: np.ndarray = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return normed


def rows(matrix: np.ndarray, event_id: str, start: int = 0) -> list[Row]:
    return [Row(f"r{start + i:03d}", v, event_id, f"t{start + i}") for i, v in enumerate(matrix)]


def write(store: VectorStore, name: str, matrix: np.ndarray, event_id: str, start: int = 0) -> None:
    scope = f"test:{name}"
    store.write_batch(name, rows(matrix, event_id, start), [event_id], scope, defer_index=True)


def state(pg_url: str, name: str) -> str:
    with psycopg.connect(pg_url) as conn:
        return index_state(conn, table_name(name))


def hnsw_indexes(pg_url: str, name: str) -> list[str]:
    with psycopg.connect(pg_url) as conn:
        found = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = %s AND indexdef LIKE %s",
            [table_name(name), "%hnsw%"],
        ).fetchall()
    return [str(r[0]) for r in found]


def backdate(pg_url: str, name: str) -> None:
    """Make every row look written an hour ago: the collection's load went quiet."""
    query = sql.SQL("UPDATE {} SET updated_at = now() - interval '1 hour'").format(
        sql.Identifier(table_name(name))
    )
    with psycopg.connect(pg_url) as conn:
        conn.execute(query)


def assert_searches_exact(store: VectorStore, name: str, matrix: np.ndarray) -> None:
    """The top 5 of a few queries are the exact top 5 (cosine over every row)."""
    for query in unit_vectors(4, seed=99):
        exact = {f"r{i:03d}" for i in np.argsort(-(matrix @ query))[:5]}
        assert {hit.id for hit in store.search(name, query, k=5)} == exact


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def clock() -> Clock:
    return Clock()


def keeper(
    store: VectorStore, clock: Clock, threshold: int = 50, backlog: Any = None, sweep: bool = False
) -> IndexKeeper:
    """A keeper driven by the test; by default it leaves other tests' collections alone."""
    settings = Settings(bulk_load_rows=threshold, bulk_load_quiet_s=QUIET_S)
    return IndexKeeper(settings, lambda: store, backlog, clock=clock, background=False, sweep=sweep)


@pytest.fixture
def held_lock(pg_url: str, collection_name: str) -> Iterator[None]:
    """Another process holding the builder lock of the collection."""
    with (
        psycopg.connect(pg_url, autocommit=True) as conn,
        bulk.builder_lock(conn, collection_name) as held,
    ):
        assert held
        yield


# ------------------------------------------------------------------ the store


def test_an_unindexed_collection_answers_exactly_and_builds_once(
    vector_store: VectorStore, collection_name: str, pg_url: str
) -> None:
    matrix = unit_vectors(60)
    write(vector_store, collection_name, matrix, "e1")
    assert state(pg_url, collection_name) == "missing"
    (version,) = vector_store.describe(collection_name).versions
    assert not version.index.built
    assert_searches_exact(vector_store, collection_name, matrix)
    pending = vector_store.indexes.pending(collection_name, 1000)
    assert pending is not None
    assert pending.rows == 60
    capped = vector_store.indexes.pending(collection_name, 10)
    assert capped is not None
    assert capped.rows == 10

    assert vector_store.indexes.build(collection_name) == "built"
    assert vector_store.indexes.build(collection_name) == "indexed"
    (definition,) = hnsw_indexes(pg_url, collection_name)
    assert "m='16'" in definition
    assert "ef_construction='64'" in definition
    assert vector_store.indexes.pending(collection_name, 1000) is None
    assert vector_store.describe(collection_name).versions[0].index.built
    assert_searches_exact(vector_store, collection_name, matrix)
    assert vector_store.indexes.build("no_such_collection") == "gone"


def test_only_the_holder_of_the_builder_lock_builds(
    vector_store: VectorStore, collection_name: str, pg_url: str, held_lock: None
) -> None:
    write(vector_store, collection_name, unit_vectors(5), "e1")
    assert vector_store.indexes.build(collection_name) == "busy"
    assert state(pg_url, collection_name) == "missing"
    with pytest.raises(PermanentError, match="being loaded or indexed by another process"):
        vector_store.bulk_load(collection_name, DIM, None, [], bulk.IndexBuild())


def test_events_create_indexed_collections_without_deferral(
    vector_store: VectorStore, collection_name: str, pg_url: str
) -> None:
    vector_store.write_batch(collection_name, rows(unit_vectors(3), "e1"), ["e1"], collection_name)
    assert state(pg_url, collection_name) == "valid"


# ------------------------------------------------------------------ the rule


def test_a_small_load_is_indexed_once_it_has_gone_quiet(
    vector_store: VectorStore, collection_name: str, pg_url: str, clock: Clock
) -> None:
    keep = keeper(vector_store, clock)
    write(vector_store, collection_name, unit_vectors(20), "e1")
    keep.wrote(collection_name, None)
    keep.check_due()
    assert state(pg_url, collection_name) == "missing"
    clock.now_s += QUIET_S
    keep.check_due()  # quiet here, but the rows were written just now (another worker?)
    assert state(pg_url, collection_name) == "missing"
    assert keep.watching() == {collection_name}
    backdate(pg_url, collection_name)
    clock.now_s += QUIET_S
    keep.check_due()
    assert state(pg_url, collection_name) == "valid"
    assert keep.watching() == set()


def test_a_large_load_is_indexed_when_the_stream_has_drained(
    vector_store: VectorStore, collection_name: str, pg_url: str, clock: Clock
) -> None:
    lag: dict[str, int | None] = {"s": 3}
    keep = keeper(vector_store, clock, threshold=50, backlog=lag.get)
    matrix = unit_vectors(80)
    write(vector_store, collection_name, matrix[:40], "e1")
    keep.wrote(collection_name, "s")
    keep.check_due()  # 40 rows: below the threshold
    lag["s"] = 0
    keep.check_due()  # not due: nothing written since
    assert state(pg_url, collection_name) == "missing"
    lag["s"] = 3
    write(vector_store, collection_name, matrix[40:], "e2", start=40)
    keep.wrote(collection_name, "s")
    keep.check_due()  # 80 rows, entries still waiting
    lag["s"] = None  # Redis cannot tell: not drained
    keep.wrote(collection_name, "s")
    keep.check_due()
    assert state(pg_url, collection_name) == "missing"
    lag["s"] = 0
    keep.wrote(collection_name, "s")
    keep.check_due()
    assert state(pg_url, collection_name) == "valid"
    assert_searches_exact(vector_store, collection_name, matrix)


def test_without_deferral_an_unindexed_collection_is_built_at_once(
    vector_store: VectorStore, collection_name: str, pg_url: str, clock: Clock
) -> None:
    keep = keeper(vector_store, clock, threshold=0)
    write(vector_store, collection_name, unit_vectors(5), "e1")
    keep.wrote(collection_name, None)
    keep.check_due()
    assert state(pg_url, collection_name) == "valid"


def test_a_busy_build_is_looked_at_again(
    vector_store: VectorStore, collection_name: str, pg_url: str, clock: Clock
) -> None:
    keep = keeper(vector_store, clock, threshold=0)
    write(vector_store, collection_name, unit_vectors(5), "e1")
    with (
        psycopg.connect(pg_url, autocommit=True) as conn,
        bulk.builder_lock(conn, collection_name),
    ):
        keep.wrote(collection_name, None)
        keep.check_due()
        assert state(pg_url, collection_name) == "missing"
    clock.now_s += QUIET_S - 1
    keep.wrote(collection_name, None)  # the holder builds: no new try at every read
    keep.check_due()
    assert state(pg_url, collection_name) == "missing"
    clock.now_s += 1
    keep.check_due()
    assert state(pg_url, collection_name) == "valid"


def test_a_new_keeper_finds_collections_a_dead_worker_left_unindexed(
    vector_store: VectorStore, collection_name: str, pg_url: str, clock: Clock
) -> None:
    write(vector_store, collection_name, unit_vectors(5), "e1")
    backdate(pg_url, collection_name)
    keep = keeper(vector_store, clock, sweep=True)
    keep.check_due()
    assert state(pg_url, collection_name) == "valid"


def test_a_collection_that_is_gone_is_forgotten(vector_store: VectorStore, clock: Clock) -> None:
    keep = keeper(vector_store, clock, threshold=0)
    keep.wrote("never_created", None)
    keep.check_due()
    assert keep.watching() == set()


# ------------------------------------------------------------------ workers


def event(event_id: str, collection: str, matrix: np.ndarray, start: int) -> dict[str, Any]:
    records = [
        {"id": f"r{start + i:03d}", "vector": v.tolist(), "text": f"t{start + i}"}
        for i, v in enumerate(matrix)
    ]
    return {"type": "new-data", "id": event_id, "collection": collection, "records": records}


def load_through_worker(
    ctx: Context, store: VectorStore, collection: str, matrix: np.ndarray, per_event: int
) -> NewDataHandler:
    """Publish ``matrix`` as events, then run a worker until all are written and the
    collection has its index."""
    for n, start in enumerate(range(0, len(matrix), per_event)):
        chunk = matrix[start : start + per_event]
        publish(ctx.redis, ctx.keys.new_data, event(f"e{n}", collection, chunk, start))
    events = -(-len(matrix) // per_event)
    service = EmbeddingService(ctx.settings, ModelCache.from_settings(ctx.settings), None)
    backlog = stream_backlog(ctx.redis, ctx.settings.group)
    handler = NewDataHandler(ctx.settings, lambda: store, service, backlog)
    worker = make_worker(ctx, handler)
    worker.ctx.broker.ensure_groups(worker.streams)
    with running(worker):
        wait_for(lambda: len(completions(ctx)) >= events)
    assert all(c.status == "succeeded" for c in completions(ctx))
    # Only this collection: the keeper's first sweep also watches collections that
    # earlier tests left without their index, and those stay watched until quiet.
    wait_for(lambda: collection not in handler.indexes.watching())
    return handler


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch, collection_name: str) -> list[int]:
    """The rows of the test's collection at each build of its HNSW index (a keeper may
    also build collections other tests left without theirs)."""
    found: list[int] = []
    original = bulk.build_index

    def counted(conn: psycopg.Connection[Any], collection: Any, *args: Any) -> None:
        if collection.name == collection_name:
            query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(collection.table))
            row = conn.execute(query).fetchone()
            found.append(int(row[0]) if row else 0)
        original(conn, collection, *args)

    monkeypatch.setattr(bulk, "build_index", counted)
    return found


def test_a_first_load_past_the_threshold_builds_one_index_after_it(
    ctx: Context,
    vector_store: VectorStore,
    collection_name: str,
    pg_url: str,
    builds: list[int],
) -> None:
    # Two events per read, so the load takes three reads; never quiet within the test.
    settings = ctx.settings.replace(bulk_load_rows=50, bulk_load_quiet_s=600.0, max_batch_size=2)
    matrix = unit_vectors(120)
    load_through_worker(replace(ctx, settings=settings), vector_store, collection_name, matrix, 20)
    assert state(pg_url, collection_name) == "valid"
    assert len(hnsw_indexes(pg_url, collection_name)) == 1
    assert len(builds) == 1
    assert builds[0] >= 50
    assert vector_store.count(collection_name) == 120
    assert_searches_exact(vector_store, collection_name, matrix)


def test_a_small_first_load_gets_its_index_once_quiet(
    ctx: Context,
    vector_store: VectorStore,
    collection_name: str,
    pg_url: str,
    builds: list[int],
) -> None:
    settings = ctx.settings.replace(bulk_load_rows=1000, bulk_load_quiet_s=0.2)
    matrix = unit_vectors(30)
    load_through_worker(replace(ctx, settings=settings), vector_store, collection_name, matrix, 10)
    assert state(pg_url, collection_name) == "valid"
    assert builds == [30]
    assert_searches_exact(vector_store, collection_name, matrix)


def test_with_deferral_off_events_create_the_index_with_the_collection(
    ctx: Context,
    vector_store: VectorStore,
    collection_name: str,
    pg_url: str,
    builds: list[int],
) -> None:
    settings = ctx.settings.replace(bulk_load_rows=0)
    matrix = unit_vectors(10)
    load_through_worker(replace(ctx, settings=settings), vector_store, collection_name, matrix, 5)
    assert state(pg_url, collection_name) == "valid"
    assert builds == []
    assert_searches_exact(vector_store, collection_name, matrix)
