"""``forge predict``: label texts or vectors with a registered model version.

A module of its own, apart from ``forge models``: it needs a trainer and, for texts,
the embedding model, which the registry commands do not.
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec
import numpy as np

from forge.cli.cmd_models import mlflow_errors
from forge.cli.output import print_json, print_table, shorten
from forge.errors import ConfigError
from forge.settings import Settings
from forge.training.service import TrainingService
from forge.training.versions import VersionInfo


def run_predict(args: argparse.Namespace, settings: Settings) -> int:
    name, _, ref = args.model.partition("@")
    with mlflow_errors():
        service = TrainingService.from_settings(settings)
        model, version = service.load(name, ref or None)
    inputs: list[str] = args.text or [_vector_text(v) for v in args.vector]
    if args.text:
        vectors = _embed(settings, version, args.text)
    elif len({len(v) for v in args.vector}) > 1:
        raise ConfigError("every --vector must have the same number of values")
    else:
        vectors = np.asarray(args.vector, dtype=np.float32)
    predictions = model.predict(vectors)
    if args.json:
        print_json(
            [
                {
                    "input": i,
                    "label": p.label,
                    "score": p.score,
                    "model": name,
                    "version": version.version,
                }
                for i, p in zip(inputs, predictions, strict=True)
            ]
        )
        return 0
    rows = [
        [p.label, f"{p.score:.4f}", shorten(i, 60)]
        for i, p in zip(inputs, predictions, strict=True)
    ]
    print(f"{name} version {version.version} ({version.task})")
    print_table(["label", "score", "input"], rows)
    return 0


def _embed(settings: Settings, version: VersionInfo, texts: list[str]) -> np.ndarray[Any, Any]:
    """Embed with the model that made the training vectors (recorded on the version)."""
    if version.embedding_model is None:
        raise ConfigError(
            f"{version.model} version {version.version} was trained on raw vectors"
            f" ({version.collection!r} has no embedding model): give --vector, not --text"
        )
    # Here, not at the top: --vector needs no embedding model, nor the vector store
    # and Redis client the embedding service brings.
    from forge.embedding.service import EmbeddingService

    # A one-shot command: no Redis embedding cache to share.
    embedding = EmbeddingService.from_settings(settings, None)
    embedder = embedding.embedder(version.embedding_model)
    return embedder.encode(texts, settings.max_batch_size)


def _vector_text(vector: list[float]) -> str:
    return msgspec.json.encode(vector).decode()
