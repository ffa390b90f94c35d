"""A second real embedding model, built offline from the packaged all-MiniLM-L6-v2:
max pooling and a fixed random 384 -> 128 projection, normalised. It is saved where a
model downloaded from the hub would be cached (``FORGE_MODEL_DIR``), so workers load
it by a hub-style name, as they would any pre-downloaded model, with no network."""

from __future__ import annotations

from pathlib import Path

SECOND_MODEL = "forge-test/minilm-max-128"
SECOND_DIMENSION = 128
# Any fixed commit id: the hub cache maps refs/main to a snapshot folder of that name.
_COMMIT = "0" * 40


def save_second_model(models_path: Path) -> str:
    """Build the model under ``models_path`` (the settings' ``models_path``); its name."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    from forge.embedding.model import DEFAULT_MODEL, resolve_model_path

    base = SentenceTransformer(resolve_model_path(DEFAULT_MODEL), device="cpu")
    transformer = base[0]
    width = transformer.get_embedding_dimension()
    pooling = modules.Pooling(width, pooling_mode="max")
    weights = torch.Generator().manual_seed(14)
    dense = modules.Dense(
        width,
        SECOND_DIMENSION,
        activation_function=torch.nn.Identity(),
        init_weight=torch.randn(SECOND_DIMENSION, width, generator=weights) / width**0.5,
        init_bias=torch.zeros(SECOND_DIMENSION),
    )
    model = SentenceTransformer(modules=[transformer, pooling, dense, modules.Normalize()])
    org, name = SECOND_MODEL.split("/")
    repo = models_path / "sentence-transformers" / f"models--{org}--{name}"
    model.save(str(repo / "snapshots" / _COMMIT))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(_COMMIT)
    return SECOND_MODEL
