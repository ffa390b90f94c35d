"""``halfvec`` storage: float16 collections, half the size, searched, read and written
like float32 ones; a collection re-embedded into halfvec. Real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest

from forge.errors import ConfigError
from forge.settings import Settings
from forge.vectorstore import IndexOptions, Row, VectorStore, table_name
from forge.vectorstore.naming import index_name

pytestmark = pytest.mark.postgres

DIM = 384
ROWS = 400


@pytest.fixture
def half_store(pg_url: str) -> Iterator[VectorStore]:
    store = VectorStore(pg_url, max_connections=2, index=IndexOptions(storage="halfvec"))
    store.open()
    try:
        yield store
    finally:
        store.close()


def vectors(n: int, seed: int = 0) -> np.ndarray:
    matrix = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def fill(store: VectorStore, name: str, matrix: np.ndarray) -> None:
    rows = [Row(f"r{i:04d}", matrix[i], "load", f"t{i}", {"i": i}, "m") for i in range(len(matrix))]
    store.write_batch(name, rows, ["load"], f"test-{uuid.uuid4().hex[:8]}")


def test_halfvec_collections_answer_like_vector_ones_at_half_the_size(
    vector_store: VectorStore, half_store: VectorStore, pg_url: str
) -> None:
    matrix = vectors(ROWS)
    full, half = f"full_{uuid.uuid4().hex[:8]}", f"half_{uuid.uuid4().hex[:8]}"
    fill(vector_store, full, matrix)
    fill(half_store, half, matrix)
    try:
        for i in (0, 7, 123):
            hit = half_store.search(half, matrix[i], k=1)[0]
            assert (hit.id, hit.metadata) == (f"r{i:04d}", {"i": i})
            assert hit.score == pytest.approx(1.0, abs=1e-3)
        stored = half_store.fetch(half, ["r0007"])["r0007"]
        assert stored.embedding.dtype == np.float32
        np.testing.assert_allclose(stored.embedding, matrix[7], atol=1e-3)
        snapshot = half_store.load_collection(half)
        assert snapshot.vectors.shape == (ROWS, DIM)
        with psycopg.connect(pg_url) as conn:
            definition = conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE indexname = %s",
                [index_name(table_name(half))],
            ).fetchone()
        assert definition is not None
        assert "halfvec_cosine_ops" in definition[0]
        full_info, half_info = vector_store.describe(full), vector_store.describe(half)
        assert (full_info.versions[0].storage, half_info.versions[0].storage) == (
            "vector",
            "halfvec",
        )
        assert half_info.size_bytes < 0.75 * full_info.size_bytes
    finally:
        vector_store.drop_collection(full)
        vector_store.drop_collection(half)


def test_a_collection_re_embedded_into_halfvec(
    vector_store: VectorStore, collection_name: str
) -> None:
    matrix = vectors(10, seed=1)
    fill(vector_store, collection_name, matrix)
    plan = vector_store.versions.begin(collection_name, "m", DIM, 100, storage="halfvec")
    assert plan is not None
    assert plan.version.storage == "halfvec"
    rows = [
        Row(record_id, matrix[int(record_id[1:])], "bf", text, {}, "m", "v")
        for record_id, text in vector_store.versions.range_rows(collection_name, plan.ranges[0])
    ]
    result = vector_store.versions.write_backfill(
        collection_name, 2, rows, "bf", collection_name, {}
    )
    assert result.switched
    active = vector_store.collection(collection_name)
    assert active is not None
    assert (active.version, active.storage) == (2, "halfvec")
    assert vector_store.search(collection_name, matrix[3], k=1)[0].id == "r0003"


def test_an_unknown_storage_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="vector_storage"):
        Settings.from_env({"FORGE_VECTOR_STORAGE": "float8"})
