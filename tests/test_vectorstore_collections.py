"""Creating collections: HNSW index options, and first writes that fail or race."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from forge.errors import ConfigError
from forge.runtime.context import Context
from forge.settings import Settings
from forge.vectorstore import IndexOptions, InvalidWrite, Row, VectorStore, catalog, table_name
from forge.vectorstore import search as search_module
from forge.vectorstore.naming import index_name
from forge.vectorstore.search import ef_search_for

pytestmark = pytest.mark.postgres

DIM = 8
TUNED = IndexOptions(m=8, ef_construction=32, ef_search=77)


@pytest.fixture
def scope(vector_store: VectorStore) -> Iterator[str]:
    value = f"test-{uuid.uuid4().hex[:10]}"
    yield value
    vector_store.prune_processed(-1, scope=value)


@pytest.fixture
def tuned_store(pg_url: str) -> Iterator[VectorStore]:
    store = VectorStore(pg_url, max_connections=2, index=TUNED)
    store.open()
    try:
        yield store
    finally:
        store.close()


def unit(dim: int = DIM) -> np.ndarray:
    return np.full(dim, 1 / np.sqrt(dim), dtype=np.float32)


def row(record_id: str, event_id: str, **kw: Any) -> Row:
    return Row(**{"id": record_id, "embedding": unit(), "event_id": event_id, **kw})


def index_options(pg_url: str, collection: str) -> set[str]:
    with psycopg.connect(pg_url) as conn:
        found = conn.execute(
            "SELECT reloptions FROM pg_class WHERE relname = %s",
            [index_name(table_name(collection))],
        ).fetchone()
    assert found is not None, "no index"
    return set(found[0] or [])


def table_exists(pg_url: str, collection: str) -> bool:
    with psycopg.connect(pg_url) as conn:
        found = conn.execute(
            "SELECT to_regclass(quote_ident(%s))", [table_name(collection)]
        ).fetchone()
    return found is not None and found[0] is not None


# ------------------------------------------------------------------ index options


def test_default_index_has_pgvectors_defaults(
    vector_store: VectorStore, pg_url: str, collection_name: str
) -> None:
    vector_store.ensure_collection(collection_name, DIM)
    assert index_options(pg_url, collection_name) == {"m=16", "ef_construction=64"}


def test_first_write_builds_the_configured_index(
    tuned_store: VectorStore, pg_url: str, collection_name: str, scope: str
) -> None:
    tuned_store.write_batch(collection_name, [row("r1", "e1")], ["e1"], scope)
    assert index_options(pg_url, collection_name) == {"m=8", "ef_construction=32"}


def test_existing_collections_keep_their_index(
    vector_store: VectorStore, tuned_store: VectorStore, pg_url: str, collection_name: str
) -> None:
    vector_store.ensure_collection(collection_name, DIM)
    tuned_store.ensure_collection(collection_name, DIM)
    assert index_options(pg_url, collection_name) == {"m=16", "ef_construction=64"}


def test_store_from_settings_takes_the_hnsw_settings() -> None:
    settings = Settings(hnsw_m=12, hnsw_ef_construction=40, hnsw_ef_search=90)
    store = VectorStore.from_settings("postgresql://unused", settings, max_connections=2)
    assert store.index == IndexOptions(m=12, ef_construction=40, ef_search=90)
    assert VectorStore("postgresql://unused").index == IndexOptions(16, 64, 40)


def test_workers_open_their_store_with_the_hnsw_settings(pg_url: str, ctx: Context) -> None:
    from consumers import open_store

    ctx = replace(
        ctx,
        settings=ctx.settings.replace(
            postgres_url=pg_url, hnsw_m=8, hnsw_ef_construction=32, hnsw_ef_search=100
        ),
    )
    assert open_store(ctx).index == IndexOptions(8, 32, 100)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"FORGE_HNSW_M": "1"}, "hnsw_m must be 2-100"),
        ({"FORGE_HNSW_M": "101"}, "hnsw_m must be 2-100"),
        ({"FORGE_HNSW_EF_CONSTRUCTION": "1001"}, "hnsw_ef_construction must be 4-1000"),
        ({"FORGE_HNSW_M": "40"}, r"at least twice hnsw_m \(80\), got 64"),
        ({"FORGE_HNSW_EF_SEARCH": "0"}, "hnsw_ef_search must be 1-1000"),
        ({"FORGE_HNSW_EF_SEARCH": "1001"}, "hnsw_ef_search must be 1-1000"),
        ({"FORGE_HNSW_EF_SEARCH": "many"}, "FORGE_HNSW_EF_SEARCH='many'"),
    ],
)
def test_bad_hnsw_settings_are_refused(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        Settings.from_env(env)


def test_hnsw_settings_from_env() -> None:
    env = {"FORGE_HNSW_M": "8", "FORGE_HNSW_EF_CONSTRUCTION": "16", "FORGE_HNSW_EF_SEARCH": "1"}
    assert IndexOptions.from_settings(Settings.from_env(env)) == IndexOptions(8, 16, 1)
    with pytest.raises(ConfigError, match="hnsw_m"):
        IndexOptions(m=0)


def test_ef_search_is_raised_to_k_up_to_pgvectors_limit() -> None:
    assert ef_search_for(10, 77) == 77
    assert ef_search_for(100, 77) == 100
    assert ef_search_for(5000, 77) == 1000


def test_search_runs_with_the_configured_ef_search(
    tuned_store: VectorStore, pg_url: str, collection_name: str, scope: str
) -> None:
    collection = tuned_store.ensure_collection(collection_name, DIM)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        register_vector(conn)
        # Search's transaction is then a savepoint, whose SET LOCAL outlives it.
        with conn.transaction():
            search_module.search(conn, collection, unit(), 5, ef_search=77)
            shown = conn.execute("SELECT current_setting('hnsw.ef_search')").fetchone()
    assert shown == ("77",)


def test_store_searches_with_its_ef_search(
    tuned_store: VectorStore, collection_name: str, scope: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tuned_store.write_batch(collection_name, [row("r1", "e1")], ["e1"], scope)
    seen: list[int] = []
    real = search_module.search

    def spy(*args: Any, ef_search: int, **kwargs: Any) -> Any:
        seen.append(ef_search)
        return real(*args, ef_search=ef_search, **kwargs)

    monkeypatch.setattr(search_module, "search", spy)
    assert [hit.id for hit in tuned_store.search(collection_name, unit(), 3)] == ["r1"]
    assert seen == [77]


# ----------------------------------------------------------- failed or racing first writes


@pytest.mark.parametrize(
    "change",
    [
        {"embedding": np.full(DIM, np.nan, dtype=np.float32)},
        {"embedding": unit(DIM + 1)},
        {"text": "nul\x00byte"},  # found while encoding, inside the write's transaction
    ],
)
def test_rejected_first_write_leaves_no_collection(
    vector_store: VectorStore, pg_url: str, collection_name: str, scope: str, change: dict[str, Any]
) -> None:
    writes = [row("ok", "e1"), row("bad", "e2", **change)]
    with pytest.raises(InvalidWrite) as info:
        vector_store.write_batch(collection_name, writes, ["e1", "e2"], scope)
    assert info.value.event_id == "e2"
    assert vector_store.collection(collection_name) is None
    assert not table_exists(pg_url, collection_name)
    assert vector_store.already_processed(scope, ["e1", "e2"]) == {}
    # Nothing cached either: the next first write picks the dimension afresh.
    other = Row(id="r", embedding=unit(DIM + 2), event_id="e3")
    vector_store.write_batch(collection_name, [other], ["e3"], scope)
    created = vector_store.collection(collection_name)
    assert created is not None
    assert created.dimension == DIM + 2


def test_creator_that_rolls_back_leaves_the_name_to_the_next(
    vector_store: VectorStore, pg_url: str, collection_name: str, scope: str
) -> None:
    outcome: dict[str, Any] = {}

    def write() -> None:
        outcome["result"] = vector_store.write_batch(
            collection_name, [row("r1", "e1")], ["e1"], scope
        )

    thread = threading.Thread(target=write)
    with psycopg.connect(pg_url, autocommit=True) as other, other.transaction():
        # Another worker's first write has created the collection, not committed yet.
        catalog.ensure_collection(other, collection_name, DIM + 1, None)
        thread.start()
        wait_for_advisory_lock(pg_url)
        assert thread.is_alive(), "the second creator must wait for the first"
        raise psycopg.Rollback  # the other worker's batch was rejected
    thread.join(timeout=60)
    assert outcome["result"].processed == ["e1"]
    created = vector_store.collection(collection_name)
    assert created is not None
    assert created.dimension == DIM
    assert vector_store.count(collection_name) == 1


def test_concurrent_first_writes_create_one_collection(
    vector_store: VectorStore, collection_name: str, scope: str
) -> None:
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        barrier.wait()
        try:
            event = f"e{worker}"
            vector_store.write_batch(collection_name, [row(f"r{worker}", event)], [event], scope)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert vector_store.count(collection_name) == 4


def wait_for_advisory_lock(pg_url: str, timeout_s: float = 60.0) -> None:
    """Until some session waits for an advisory lock (the creator's)."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(pg_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            found = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
            ).fetchone()
            if found and found[0]:
                return
            time.sleep(0.02)
    raise AssertionError("no session waits for an advisory lock")
