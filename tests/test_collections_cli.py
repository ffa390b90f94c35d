"""``forge collections list | show``: versions, rows, model, dimension, index and size
of each collection, read from real PostgreSQL."""

from __future__ import annotations

import json

import numpy as np
import psycopg
import pytest

from forge.runtime.context import Context
from forge.vectorstore import Row, VectorStore, migrate
from forge.vectorstore.migrations import MIGRATIONS, apply_migrations
from tests.support.cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.postgres

DIM = 4


@pytest.fixture
def env(cli_env: Context, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Context:
    monkeypatch.setenv("POSTGRES_URL", pg_url)
    return cli_env


def fill(store: VectorStore, collection: str, rows: int) -> None:
    writes = [
        Row(f"r{i}", np.eye(DIM, dtype=np.float32)[i % DIM], "load", text=f"t{i}", model="m")
        for i in range(rows)
    ]
    store.write_batch(collection, writes, ["load"], f"test:{collection}")


def test_show_prints_the_versions_as_json(
    env: Context,
    vector_store: VectorStore,
    collection_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fill(vector_store, collection_name, 5)
    code, out, _ = run_cli(capsys, "collections", "show", collection_name, "--json")
    assert code == 0
    shown = json.loads(out)
    assert (shown["name"], shown["active_version"], shown["rows"]) == (collection_name, 1, 5)
    assert (shown["model"], shown["dimension"]) == ("m", DIM)
    (version,) = shown["versions"]
    assert {k: version[k] for k in ("version", "model", "state", "rows", "dimension")} == {
        "version": 1,
        "model": "m",
        "state": "active",
        "rows": 5,
        "dimension": DIM,
    }
    assert version["index"] == {"type": "hnsw", "m": 16, "ef_construction": 64, "built": True}
    assert version["storage"] == "vector"
    assert version["size_bytes"] > 0
    assert shown["size_bytes"] == version["size_bytes"]


def test_list_and_show_print_tables(
    env: Context,
    vector_store: VectorStore,
    collection_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fill(vector_store, collection_name, 3)
    code, out, _ = run_cli(capsys, "collections", "list")
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split()[:4] == ["collection", "active", "versions", "rows"]
    (line,) = [x for x in lines if x.startswith(f"{collection_name} ")]
    assert line.split()[1:5] == ["1", "1:active", "3", "m"]
    assert "hnsw m=16 ef_construction=64" in line
    code, out, _ = run_cli(capsys, "collections", "show", collection_name)
    assert code == 0
    assert out.splitlines()[0] == f"collection {collection_name}: active version 1, 3 rows"
    code, out, _ = run_cli(capsys, "collections", "list", "--json")
    assert collection_name in {c["name"] for c in json.loads(out)}


def test_bad_or_unknown_collections_are_one_line_errors(
    env: Context, vector_store: VectorStore, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "collections", "show", "no;such")
    assert_one_line_error(code, err, "invalid collection name")
    code, _, err = run_cli(capsys, "collections", "show", "never_created_here")
    assert_one_line_error(code, err, "never_created_here", "does not exist")


def test_migration_3_makes_each_collection_its_version_1(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url) as conn:
        apply_migrations(conn, MIGRATIONS[:2])
        conn.execute("CREATE TABLE coll_old (id text PRIMARY KEY, embedding vector(3))")
        conn.execute(
            "CREATE INDEX coll_old_embedding_hnsw ON coll_old USING hnsw"
            " (embedding vector_cosine_ops) WITH (m = 8, ef_construction = 40)"
        )
        conn.execute("INSERT INTO forge_collections VALUES ('old', 'coll_old', 3, 'm')")
        conn.commit()
    assert 3 in migrate(empty_db_url)
    with VectorStore(empty_db_url) as store:
        info = store.describe("old")
    assert info.active_version == 1
    (version,) = info.versions
    assert (version.table, version.state, version.model) == ("coll_old", "active", "m")
    assert (version.index.m, version.index.ef_construction) == (8, 40)
