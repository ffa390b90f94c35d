"""``forge predict``: label texts or vectors with a registered model version.

A module of its own, apart from ``forge models``: it needs a trainer and, for texts,
the embedding model, which the registry commands do not. When a ``forge serve``
answers at the configured address, it asks that server instead, whose models are
loaded already; the output is the same either way.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from forge.cli.cmd_models import mlflow_errors
from forge.cli.output import print_json, print_table, shorten
from forge.errors import ConfigError
from forge.serving.client import ServerClient
from forge.settings import Settings
from forge.training.versions import CHAMPION, VersionInfo


@dataclass(frozen=True, slots=True)
class _Labelled:
    version: int
    task: str
    predictions: list[tuple[str, float]]


def run_predict(args: argparse.Namespace, settings: Settings) -> int:
    name, _, ref = args.model.partition("@")
    if args.vector and len({len(v) for v in args.vector}) > 1:
        raise ConfigError("every --vector must have the same number of values")
    server = ServerClient.find(settings)
    if server is not None:
        labelled = _remote(server, name, ref or CHAMPION, args)
    else:
        labelled = _local(settings, name, ref or None, args)
    inputs: list[str] = args.text or [_vector_text(v) for v in args.vector]
    pairs = list(zip(inputs, labelled.predictions, strict=True))
    if args.json:
        print_json(
            [
                {
                    "input": i,
                    "label": label,
                    "score": score,
                    "model": name,
                    "version": labelled.version,
                }
                for i, (label, score) in pairs
            ]
        )
        return 0
    rows = [[label, f"{score:.4f}", shorten(i, 60)] for i, (label, score) in pairs]
    print(f"{name} version {labelled.version} ({labelled.task})")
    print_table(["label", "score", "input"], rows)
    return 0


def _remote(server: ServerClient, name: str, ref: str, args: argparse.Namespace) -> _Labelled:
    """Pinned to ``ref`` (the champion by default), as the local path resolves it: a
    server's traffic split is for live traffic, not for this command."""
    rows = [{"text": t} for t in args.text] if args.text else [{"vector": v} for v in args.vector]
    answer = server.predict(name, rows, ref)
    predictions = [(p["label"], p["score"]) for p in answer["predictions"]]
    task = "" if args.json else _task(server.model(name), answer["version"])
    return _Labelled(int(answer["version"]), task, predictions)


def _task(model: dict[str, Any], version: int) -> str:
    return next((str(v["task"]) for v in model["versions"] if v["version"] == version), "")


def _local(settings: Settings, name: str, ref: str | None, args: argparse.Namespace) -> _Labelled:
    from forge.training.service import TrainingService

    with mlflow_errors():
        service = TrainingService.from_settings(settings)
        model, version = service.load(name, ref)
    if args.text:
        vectors = _embed(settings, version, args.text)
    else:
        vectors = np.asarray(args.vector, dtype=np.float32)
    predictions = [(p.label, p.score) for p in model.predict(vectors)]
    return _Labelled(version.version, version.task, predictions)


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
