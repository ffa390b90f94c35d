from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from forge.embedding.model import DEFAULT_MODEL, Embedder, resolve_model_path, weights_version


def test_paraphrases_are_closer_than_unrelated_text(embedder: Embedder) -> None:
    vectors = embedder.encode(
        [
            "The cat sat on the mat.",
            "A cat was sitting on a rug.",
            "Quarterly revenue grew by eight percent.",
        ],
        batch_size=8,
    )
    paraphrase = float(vectors[0] @ vectors[1])
    unrelated = float(vectors[0] @ vectors[2])
    assert paraphrase > unrelated + 0.3


def test_vectors_are_unit_length_float32(embedder: Embedder) -> None:
    vectors = embedder.encode([f"sentence number {i}" for i in range(5)], batch_size=2)
    assert vectors.dtype == np.float32
    assert vectors.shape == (5, embedder.dimension)
    assert vectors.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_encode_is_deterministic_and_batch_independent(embedder: Embedder) -> None:
    texts = ["alpha", "beta", "gamma"]
    together = embedder.encode(texts, batch_size=3)
    one_by_one = embedder.encode(texts, batch_size=1)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_empty_input(embedder: Embedder) -> None:
    assert embedder.encode([], batch_size=4).shape == (0, embedder.dimension)


def test_rejects_non_positive_batch_size(embedder: Embedder) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        embedder.encode(["x"], batch_size=0)


def test_describes_the_packaged_model(embedder: Embedder) -> None:
    assert embedder.name == DEFAULT_MODEL
    assert embedder.dimension == 384
    assert embedder.device == "cpu"
    # all-MiniLM-L6-v2 has ~22.7M float32 parameters.
    assert 80_000_000 < embedder.size_bytes < 100_000_000
    assert len(embedder.version) == 16
    int(embedder.version, 16)
    assert embedder.cache_id == f"{DEFAULT_MODEL}@{embedder.version}"


def test_version_identifies_the_weights(embedder: Embedder) -> None:
    model = embedder._model
    assert weights_version(model) == embedder.version
    import torch

    with torch.no_grad():
        parameter = next(model.parameters())
        original = parameter.clone()
        parameter[0].add_(1.0)
        try:
            assert weights_version(model) != embedder.version
        finally:
            parameter.copy_(original)
    assert weights_version(model) == embedder.version


def test_model_names_resolve_offline() -> None:
    packaged = resolve_model_path(DEFAULT_MODEL)
    assert resolve_model_path(f"sentence-transformers/{DEFAULT_MODEL}") == packaged
    assert packaged.endswith("model")
    assert resolve_model_path("/models/my-encoder") == "/models/my-encoder"
    assert resolve_model_path("BAAI/bge-small-en-v1.5") == "BAAI/bge-small-en-v1.5"


def test_unknown_hub_model_is_not_downloaded(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"(?i)offline|cached|connect"):
        Embedder.load("forge-test/no-such-model", device="cpu", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())
