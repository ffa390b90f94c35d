"""``forge collections load``: a new collection's first load from JSON lines, copied
without the HNSW index, which is built once afterwards. Real PostgreSQL and model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from forge.embedding.model import Embedder
from forge.runtime.context import Context
from forge.vectorstore import IndexOptions, Row, VectorStore, bulk, table_name, writer
from forge.vectorstore.naming import index_name
from tests.support.cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.postgres

TOPICS = ["refund for a broken order", "cannot log in", "parcel never arrived"]


@pytest.fixture
def env(cli_env: Context, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Context:
    monkeypatch.setenv("POSTGRES_URL", pg_url)
    return cli_env


def write_lines(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def index_definition(pg_url: str, collection: str) -> str | None:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = %s",
            [index_name(table_name(collection))],
        ).fetchone()
    return str(row[0]) if row else None


def test_a_first_load_builds_the_index_once(
    env: Context,
    vector_store: VectorStore,
    collection_name: str,
    embedder: Embedder,
    pg_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    records = [
        {"id": f"d{i:02d}", "text": f"{TOPICS[i % 3]} #{i}", "metadata": {"topic": i % 3}}
        for i in range(30)
    ]
    source = write_lines(tmp_path / "records.jsonl", records)
    code, out, err = run_cli(capsys, "collections", "load", collection_name, str(source))
    assert code == 0, err
    assert out.startswith(f"collection {collection_name}: 30 rows loaded")
    assert vector_store.count(collection_name) == 30
    definition = index_definition(pg_url, collection_name)
    assert definition is not None
    assert "hnsw" in definition
    assert "m='16'" in definition
    assert "ef_construction='64'" in definition
    stored = vector_store.fetch(collection_name, ["d00"])["d00"]
    assert (stored.model, stored.model_version) == (embedder.name, embedder.version)
    query = embedder.encode(["my order came broken, refund me"], 8)[0]
    hits = vector_store.search(collection_name, query, k=3)
    assert all(h.metadata["topic"] == 0 for h in hits)

    code, _, err = run_cli(capsys, "collections", "load", collection_name, str(source))
    assert_one_line_error(code, err, "has rows", "new collection")


def test_bad_files_are_one_line_errors(
    env: Context, vector_store: VectorStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "collections", "load", "c1", str(tmp_path / "missing.jsonl"))
    assert_one_line_error(code, err, "no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "vector": [1, 0]}\n{"id": "b"}\n')
    code, _, err = run_cli(capsys, "collections", "load", "c1", str(bad))
    assert_one_line_error(code, err, "bad.jsonl:2:", "neither `text` nor `vector`")
    assert vector_store.collection("c1") is None


def test_searches_and_writes_go_on_before_the_index_exists(
    vector_store: VectorStore, collection_name: str, pg_url: str
) -> None:
    """Between the copy and the build (and during a concurrent build) the collection
    has no usable index: searches are exact scans, writes are accepted."""
    rows = [Row(f"r{i}", np.eye(4, dtype=np.float32)[i % 4], "load", f"t{i}") for i in range(8)]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        register_vector(conn)
        conn.execute(writer.CREATE_STAGING)
        target = bulk.create_unindexed(conn, collection_name, 4, None, IndexOptions())
        assert bulk.load(conn, target, [rows]) == 8
        assert index_definition(pg_url, collection_name) is None
        hits = vector_store.search(collection_name, np.eye(4, dtype=np.float32)[1], k=2)
        assert sorted(h.id for h in hits) == ["r1", "r5"]
        extra = Row("x", np.ones(4, dtype=np.float32), "e1", "live")
        vector_store.write_batch(collection_name, [extra], ["e1"], f"test:{collection_name}")
        bulk.build_index(conn, target, IndexOptions(), bulk.IndexBuild(memory_mb=64, workers=1))
    assert index_definition(pg_url, collection_name) is not None
    assert vector_store.count(collection_name) == 9


def test_build_index_builds_a_deferred_index_now(
    env: Context,
    vector_store: VectorStore,
    collection_name: str,
    pg_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = [Row(f"r{i}", np.eye(4, dtype=np.float32)[i % 4], "e1", f"t{i}") for i in range(8)]
    vector_store.write_batch(collection_name, rows, ["e1"], collection_name, defer_index=True)
    code, out, _ = run_cli(capsys, "collections", "show", collection_name)
    assert code == 0
    assert "not built yet" in out
    with psycopg.connect(pg_url, autocommit=True) as conn, bulk.builder_lock(conn, collection_name):
        code, _, err = run_cli(capsys, "collections", "build-index", collection_name)
        assert_one_line_error(code, err, "being loaded or indexed by another process")
    assert index_definition(pg_url, collection_name) is None
    code, out, err = run_cli(
        capsys, "collections", "build-index", collection_name, "--index-workers", "1"
    )
    assert code == 0, err
    assert out.startswith(f"collection {collection_name}: index built in")
    assert index_definition(pg_url, collection_name) is not None
    code, out, _ = run_cli(capsys, "collections", "build-index", collection_name)
    assert (code, out.strip()) == (0, f"collection {collection_name}: its index is built already")
    code, _, err = run_cli(capsys, "collections", "build-index", "no_such_collection")
    assert_one_line_error(code, err, "does not exist")
