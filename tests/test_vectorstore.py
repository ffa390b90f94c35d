from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import psycopg_pool
import pytest

from forge.errors import InvalidEvent, is_transient
from forge.vectorstore import Delete, InvalidWrite, Row, VectorStore, Write, table_name

pytestmark = pytest.mark.postgres

DIM = 8


@pytest.fixture
def scope(vector_store: VectorStore) -> Iterator[str]:
    """Event-id markers of one test, pruned afterwards."""
    value = f"test-{uuid.uuid4().hex[:10]}"
    yield value
    vector_store.prune_processed(-1, scope=value)


def unit(*values: float) -> np.ndarray:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[: len(values)] = values
    return vector / np.linalg.norm(vector)


def row(record_id: str, event_id: str, vector: np.ndarray | None = None, **kw: Any) -> Row:
    return Row(
        id=record_id,
        embedding=unit(1.0) if vector is None else vector,
        event_id=event_id,
        **kw,
    )


def test_upsert_inserts_then_replaces(
    vector_store: VectorStore, collection_name: str, scope: str
) -> None:
    first = vector_store.write_batch(
        collection_name,
        [row("r1", "e1", unit(1, 0), text="old", metadata={"v": 1}, model="m1")],
        ["e1"],
        scope,
    )
    assert (first.processed, first.upserted, first.duplicates) == (["e1"], 1, {})
    vector_store.write_batch(
        collection_name,
        [row("r1", "e2", unit(0, 1), text="new", metadata={"v": 2}, model="m2")],
        ["e2"],
        scope,
    )
    assert vector_store.count(collection_name) == 1
    stored = vector_store.fetch(collection_name, ["r1"])["r1"]
    assert (stored.text, stored.metadata, stored.model) == ("new", {"v": 2}, "m2")
    np.testing.assert_allclose(stored.embedding, unit(0, 1), atol=1e-6)


def test_delete_removes(vector_store: VectorStore, collection_name: str, scope: str) -> None:
    rows = [row(f"r{i}", "e1") for i in range(3)]
    vector_store.write_batch(collection_name, rows, ["e1"], scope)
    result = vector_store.write_batch(
        collection_name, [Delete("r1", "e2"), Delete("missing", "e2")], ["e2"], scope
    )
    assert result.deleted == 1
    assert sorted(vector_store.fetch(collection_name, ["r0", "r1", "r2"])) == ["r0", "r2"]


def test_delete_before_collection_exists_is_a_no_op(
    vector_store: VectorStore, collection_name: str, scope: str
) -> None:
    result = vector_store.write_batch(collection_name, [Delete("r1", "e1")], ["e1"], scope)
    assert (result.processed, result.deleted) == (["e1"], 0)
    assert vector_store.collection(collection_name) is None


def test_last_write_in_a_batch_wins(
    vector_store: VectorStore, collection_name: str, scope: str
) -> None:
    writes: list[Write] = [
        row("kept", "e1", text="v1"),
        row("gone", "e1"),
        Delete("kept", "e2"),
        Delete("gone", "e2"),
        row("kept", "e3", text="v3"),
    ]
    result = vector_store.write_batch(collection_name, writes, ["e1", "e2", "e3"], scope)
    assert (result.upserted, result.processed) == (1, ["e1", "e2", "e3"])
    stored = vector_store.fetch(collection_name, ["kept", "gone"])
    assert list(stored) == ["kept"]
    assert stored["kept"].text == "v3"


def test_same_events_twice_write_once(
    vector_store: VectorStore, collection_name: str, scope: str
) -> None:
    writes = [row("r1", "e1", text="first"), row("r2", "e2")]
    vector_store.write_batch(collection_name, writes, ["e1", "e2"], scope, results={"e1": {"x": 1}})
    again = [row("r1", "e1", text="second"), row("r3", "e3")]
    result = vector_store.write_batch(collection_name, again, ["e1", "e3"], scope)
    assert result.processed == ["e3"]
    assert result.duplicates == {"e1": {"upserted": 1, "deleted": 0, "x": 1}}
    assert result.upserted == 1
    assert vector_store.fetch(collection_name, ["r1"])["r1"].text == "first"
    assert vector_store.count(collection_name) == 3


def test_already_processed_lets_callers_skip_work(
    vector_store: VectorStore, collection_name: str, scope: str
) -> None:
    vector_store.write_batch(collection_name, [row("r1", "e1")], ["e1"], scope)
    assert vector_store.already_processed(scope, ["e1", "e2"]) == {
        "e1": {"upserted": 1, "deleted": 0}
    }
    assert vector_store.already_processed(f"{scope}-other", ["e1"]) == {}


def test_markers_are_per_scope(vector_store: VectorStore, collection_name: str, scope: str) -> None:
    vector_store.write_batch(collection_name, [row("r1", "e1")], ["e1"], scope)
    other = f"{scope}-other"
    result = vector_store.write_batch(collection_name, [row("r1", "e1")], ["e1"], other)
    assert result.processed == ["e1"]
    vector_store.prune_processed(-1, scope=other)


@pytest.mark.parametrize("other_commits", [True, False])
def test_racing_writer_waits_for_the_other_transaction(
    vector_store: VectorStore, pg_url: str, collection_name: str, other_commits: bool, scope: str
) -> None:
    vector_store.write_batch(collection_name, [row("seed", "e0")], ["e0"], scope)
    outcome: dict[str, Any] = {}
    with psycopg.connect(pg_url) as other:
        # Another worker has claimed e1 but not committed yet.
        other.execute(
            "INSERT INTO forge_processed_events (scope, event_id) VALUES (%s, 'e1')", [scope]
        )

        def write() -> None:
            outcome["result"] = vector_store.write_batch(
                collection_name, [row("r1", "e1")], ["e1"], scope
            )

        thread = threading.Thread(target=write)
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive(), "the second writer must wait for the first"
        other.commit() if other_commits else other.rollback()
        thread.join(timeout=60)
    result = outcome["result"]
    if other_commits:
        assert (result.processed, list(result.duplicates)) == ([], ["e1"])
        assert vector_store.fetch(collection_name, ["r1"]) == {}
    else:
        assert (result.processed, result.duplicates) == (["e1"], {})
        assert "r1" in vector_store.fetch(collection_name, ["r1"])


def test_concurrent_writers_apply_each_event_once(
    vector_store: VectorStore, collection_name: str, scope: str
) -> None:
    event_ids = [f"e{i}" for i in range(20)]
    vector_store.ensure_collection(collection_name, DIM)
    barrier = threading.Barrier(4)
    results = []

    def write(worker: int) -> None:
        writes = [row(f"r-{e}", e, text=f"worker {worker}") for e in event_ids]
        barrier.wait()
        results.append(vector_store.write_batch(collection_name, writes, event_ids, scope))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    processed = [e for result in results for e in result.processed]
    assert sorted(processed) == sorted(event_ids)
    assert vector_store.count(collection_name) == 20


def test_dimension_mismatch_is_invalid_and_writes_nothing(
    vector_store: VectorStore, collection_name: str, scope: str
) -> None:
    vector_store.write_batch(collection_name, [row("r1", "e1")], ["e1"], scope)
    bad = Row(id="r2", embedding=np.ones(DIM + 1, dtype=np.float32), event_id="e3")
    with pytest.raises(InvalidEvent, match="dimension") as info:
        vector_store.write_batch(collection_name, [row("r9", "e2"), bad], ["e2", "e3"], scope)
    assert isinstance(info.value, InvalidWrite)
    assert (info.value.event_id, info.value.record_id) == ("e3", "r2")
    assert vector_store.already_processed(scope, ["e2", "e3"]) == {}
    assert vector_store.count(collection_name) == 1
    with pytest.raises(InvalidEvent, match="dimension"):
        vector_store.ensure_collection(collection_name, DIM + 1)
    with pytest.raises(InvalidEvent, match="dimension"):
        vector_store.search(collection_name, np.ones(3, dtype=np.float32), 1)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"embedding": np.full(DIM, np.nan, dtype=np.float32)}, "NaN"),
        ({"text": "nul\x00byte"}, "NUL"),
        ({"metadata": {"k": "nul\x00"}}, "NUL"),
        ({"embedding": np.ones((2, DIM), dtype=np.float32)}, "shape"),
    ],
)
def test_unstorable_records_are_invalid(
    vector_store: VectorStore,
    collection_name: str,
    change: dict[str, Any],
    problem: str,
    scope: str,
) -> None:
    vector_store.write_batch(collection_name, [row("ok", "e1")], ["e1"], scope)
    bad = Row(**{"id": "bad", "embedding": unit(1.0), "event_id": "e2", **change})
    with pytest.raises(InvalidWrite, match=problem) as info:
        vector_store.write_batch(collection_name, [bad], ["e2"], scope)
    assert info.value.event_id == "e2"
    assert vector_store.already_processed(scope, ["e2"]) == {}


@pytest.mark.parametrize(
    "name",
    [
        'x"; DROP TABLE forge_collections; --',
        "coll; DELETE FROM forge_processed_events",
        "a b",
        "1abc",
        "abc\n",
        "",
        "x" * 64,
        "naïve",
    ],
)
def test_identifier_injection_is_rejected(vector_store: VectorStore, name: str, scope: str) -> None:
    with pytest.raises(InvalidEvent):
        vector_store.write_batch(name, [row("r1", "e1")], ["e1"], scope)
    with pytest.raises(InvalidEvent):
        vector_store.ensure_collection(name, DIM)
    with pytest.raises(InvalidEvent):
        vector_store.search(name, unit(1.0), 1)
    assert vector_store.already_processed(scope, ["e1"]) == {}


def test_similar_names_get_distinct_tables(vector_store: VectorStore, scope: str) -> None:
    names = ["dash-name", "dash_name", "Dash_name"]
    assert len({table_name(n) for n in names}) == 3
    try:
        for i, name in enumerate(names):
            vector_store.write_batch(name, [row("r", f"{name}-e")], [f"{name}-e"], scope)
            assert vector_store.count(name) == 1, i
    finally:
        for name in names:
            vector_store.drop_collection(name)


def test_search_returns_nearest_first_with_filters(
    vector_store: VectorStore, collection_name: str, scope: str
) -> None:
    writes = [
        row("north", "e1", unit(1, 0), text="N", metadata={"kind": "a", "lang": "en"}),
        row("north-east", "e1", unit(1, 1), text="NE", metadata={"kind": "b"}),
        row("east", "e1", unit(0, 1), text="E", metadata={"kind": "a"}),
        row("south", "e1", unit(-1, 0), text="S", metadata={"kind": "b"}),
    ]
    vector_store.write_batch(collection_name, writes, ["e1"], scope)
    hits = vector_store.search(collection_name, unit(1, 0.1), k=3)
    assert [h.id for h in hits] == ["north", "north-east", "east"]
    assert hits[0].score == pytest.approx(float(unit(1, 0) @ unit(1, 0.1)), abs=1e-5)
    assert hits[0].score > hits[1].score > hits[2].score
    assert (hits[0].text, hits[0].metadata) == ("N", {"kind": "a", "lang": "en"})

    filtered = vector_store.search(collection_name, unit(1, 0.1), k=3, filters={"kind": "b"})
    assert [h.id for h in filtered] == ["north-east", "south"]
    both = vector_store.search(collection_name, unit(0, 1), 5, {"kind": "a", "lang": "en"})
    assert [h.id for h in both] == ["north"]
    assert vector_store.search(collection_name, unit(1), k=3, filters={"kind": "zzz"}) == []


def test_search_can_return_more_than_default_ef_search(
    vector_store: VectorStore, collection_name: str, scope: str
) -> None:
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((120, DIM)).astype(np.float32)
    writes = [row(f"r{i}", "e1", v / np.linalg.norm(v)) for i, v in enumerate(vectors)]
    vector_store.write_batch(collection_name, writes, ["e1"], scope)
    assert len(vector_store.search(collection_name, unit(1.0), k=100)) == 100


def test_search_unknown_collection_is_empty(vector_store: VectorStore) -> None:
    assert vector_store.search("never_created", unit(1.0), 5) == []


def test_batch_mistakes_are_programming_errors(
    vector_store: VectorStore, collection_name: str, scope: str
) -> None:
    with pytest.raises(ValueError, match="distinct"):
        vector_store.write_batch(collection_name, [], ["e1", "e1"], scope)
    with pytest.raises(ValueError, match="not in the batch"):
        vector_store.write_batch(collection_name, [row("r", "e9")], ["e1"], scope)


def test_prune_processed(vector_store: VectorStore, collection_name: str, scope: str) -> None:
    vector_store.write_batch(collection_name, [row("r", "e1")], ["e1"], scope)
    assert vector_store.prune_processed(3600, scope=scope) == 0
    assert vector_store.prune_processed(-1, scope=scope) == 1
    assert vector_store.already_processed(scope, ["e1"]) == {}


def test_server_down_errors_are_transient(tmp_path: Any) -> None:
    url = f"postgresql://postgres@/postgres?host={tmp_path}"
    store = VectorStore(url, timeout_s=0.5, connect_timeout_s=1)
    with pytest.raises(psycopg.OperationalError) as info:
        store.open(timeout_s=0.5)
    assert is_transient(info.value)
    pool_error = psycopg_pool.PoolTimeout("pool exhausted")
    assert is_transient(pool_error)
