"""Collection versions in the store: a building version beside the active one, its
backfill in ranges, writes to both meanwhile, the atomic switch, rollback and drop.
Real PostgreSQL; vectors made up (the old model writes e0, the new one e1)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg_pool import PoolTimeout

from forge.errors import PermanentError
from forge.servers.embedded_postgres import start_embedded_postgres
from forge.vectorstore import Delete, Row, VectorStore, text_hash
from forge.vectorstore.rebuild import VersionsChanged
from forge.vectorstore.types import VersionWrites

pytestmark = pytest.mark.postgres

DIM = 4
OLD = np.eye(DIM, dtype=np.float32)[0]
NEW = np.eye(DIM, dtype=np.float32)[1]


def scope() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def row(record_id: str, event_id: str, text: str, vector: np.ndarray, model: str) -> Row:
    return Row(record_id, vector, event_id, text, {"n": record_id}, model, f"{model}-v")


def load(store: VectorStore, name: str, n: int) -> None:
    rows = [row(f"r{i:03d}", "load", f"text {i}", OLD, "old") for i in range(n)]
    store.write_batch(name, rows, ["load"], scope(), model="old")


def backfill(store: VectorStore, name: str, version: int, ranges: list, event: str) -> list:
    results = []
    for i, span in enumerate(ranges):
        rows = [
            row(record_id, f"{event}-{i}", text, NEW, "new")
            for record_id, text in store.versions.range_rows(name, span)
        ]
        results.append(store.versions.write_backfill(name, version, rows, f"{event}-{i}", name, {}))
    return results


def test_a_backfill_builds_the_new_version_and_switches_when_done(
    vector_store: VectorStore, collection_name: str
) -> None:
    load(vector_store, collection_name, 10)
    plan = vector_store.versions.begin(collection_name, "new", DIM, rows_per_batch=3)
    assert (plan.version.version, plan.version.state) == (2, "building")
    assert len(plan.ranges) == 4
    assert vector_store.collection(collection_name).version == 1  # type: ignore[union-attr]
    results = backfill(vector_store, collection_name, 2, plan.ranges, "bf")
    assert [r.switched for r in results] == [False, False, False, True]
    assert sum(r.rows for r in results) == 10
    active = vector_store.collection(collection_name)
    assert active is not None
    assert (active.version, active.model) == (2, "new")
    hits = vector_store.search(collection_name, NEW, k=10)
    assert len(hits) == 10
    assert all(h.score > 0.99 for h in hits)
    info = vector_store.describe(collection_name)
    assert [(v.version, v.state, v.rows) for v in info.versions] == [
        (1, "retired", 10),
        (2, "active", 10),
    ]
    again = vector_store.versions.write_backfill(
        collection_name, 2, [], "bf-0", collection_name, {}
    )
    assert again.duplicate is not None  # a redelivered batch counts once


def test_live_writes_go_to_both_versions_and_win_over_the_backfill(
    vector_store: VectorStore, collection_name: str
) -> None:
    load(vector_store, collection_name, 4)
    plan = vector_store.versions.begin(collection_name, "new", DIM, rows_per_batch=100)
    (span,) = plan.ranges
    read = vector_store.versions.range_rows(collection_name, span)  # the backfill reads ...
    live = [row("r000", "e1", "changed", OLD, "old"), row("r009", "e1", "added", OLD, "old")]
    built = [row("r000", "e1", "changed", NEW, "new"), row("r009", "e1", "added", NEW, "new")]
    vector_store.write_batch(
        collection_name,
        [*live, Delete("r001", "e1")],
        ["e1"],
        scope(),
        version=1,
        building=VersionWrites(2, [*built, Delete("r001", "e1")]),
    )
    rows = [row(i, "bf-0", text, NEW, "new") for i, text in read]  # ... then writes
    result = vector_store.versions.write_backfill(
        collection_name, 2, rows, "bf-0", collection_name, {}
    )
    assert result.switched
    stored = vector_store.fetch(collection_name, ["r000", "r001", "r002", "r009"])
    assert sorted(stored) == ["r000", "r002", "r009"]
    assert stored["r000"].text == "changed"
    assert stored["r000"].text_hash == text_hash("changed")
    assert stored["r002"].metadata == {"n": "r002"}
    assert all(r.model == "new" for r in stored.values())
    assert vector_store.count(collection_name) == 4  # r000, r002, r003, r009


def test_a_write_that_misses_the_building_version_is_refused(
    vector_store: VectorStore, collection_name: str
) -> None:
    load(vector_store, collection_name, 2)
    vector_store.versions.begin(collection_name, "new", DIM, rows_per_batch=100)
    write = [row("x", "e1", "x", OLD, "old")]
    with pytest.raises(VersionsChanged):
        vector_store.write_batch(collection_name, write, ["e1"], scope(), version=1)
    with pytest.raises(PermanentError, match="both versions"):
        vector_store.write_batch(collection_name, write, ["e1"], scope())
    with pytest.raises(VersionsChanged, match="switched"):
        vector_store.write_batch(collection_name, write, ["e1"], scope(), version=7)
    with pytest.raises(PermanentError, match="already building version 2"):
        vector_store.versions.begin(collection_name, "other", DIM, rows_per_batch=100)


def test_rollback_and_drop_version(vector_store: VectorStore, collection_name: str) -> None:
    load(vector_store, collection_name, 3)
    plan = vector_store.versions.begin(collection_name, "new", DIM, rows_per_batch=100)
    with pytest.raises(PermanentError, match="drop it first"):
        vector_store.versions.rollback(collection_name)
    backfill(vector_store, collection_name, 2, plan.ranges, "bf")
    assert vector_store.versions.rollback(collection_name).version == 1
    assert vector_store.collection(collection_name).model == "old"  # type: ignore[union-attr]
    assert all(h.score > 0.99 for h in vector_store.search(collection_name, OLD, k=3))
    with pytest.raises(PermanentError, match="active version"):
        vector_store.versions.drop(collection_name, 1)
    assert vector_store.versions.drop(collection_name, 2).version == 2
    with pytest.raises(PermanentError, match="no earlier version"):
        vector_store.versions.rollback(collection_name)
    info = vector_store.describe(collection_name)
    assert [(v.version, v.state) for v in info.versions] == [(1, "active")]


def test_rows_without_text_cannot_be_re_embedded(
    vector_store: VectorStore, collection_name: str
) -> None:
    vector_store.write_batch(collection_name, [Row("v", OLD, "e1")], ["e1"], scope())
    with pytest.raises(PermanentError, match="1 rows without text"):
        vector_store.versions.begin(collection_name, "new", DIM, rows_per_batch=100)


def test_a_postgresql_restart_mid_backfill_loses_and_doubles_nothing(pg_tmp_path: Path) -> None:
    """A batch that fails while the server is down is simply written again once it is
    back (its transaction never committed); the backfill then finishes."""
    pgdata = pg_tmp_path / "postgres"
    handle = start_embedded_postgres(pgdata)
    store = VectorStore(handle.url, max_connections=1, timeout_s=2.0)
    try:
        store.open()
        load(store, "restarted", 9)
        plan = store.versions.begin("restarted", "new", DIM, rows_per_batch=3)
        assert plan is not None
        batches = [
            [
                row(i, f"bf-{n}", text, NEW, "new")
                for i, text in store.versions.range_rows("restarted", span)
            ]
            for n, span in enumerate(plan.ranges)
        ]
        store.versions.write_backfill("restarted", 2, batches[0], "bf-0", "bf", {})
        handle.stop()
        with pytest.raises((psycopg.OperationalError, PoolTimeout)):
            store.versions.write_backfill("restarted", 2, batches[1], "bf-1", "bf", {})
        handle = start_embedded_postgres(pgdata)
        for n in (1, 2):
            result = store.versions.write_backfill("restarted", 2, batches[n], f"bf-{n}", "bf", {})
        assert result.switched
        info = store.describe("restarted")
        assert [(v.state, v.rows, v.batches_done) for v in info.versions] == [
            ("retired", 9, 0),
            ("active", 9, 3),
        ]
    finally:
        store.close()
        handle.stop()
