"""``forge models`` (list, show, promote) and ``forge predict``: the MLflow model
registry from the command line.

MLflow is reached at the worker's tracking URI (``MLFLOW_TRACKING_URI`` or the
embedded SQLite store under ``FORGE_HOME``), so these commands see what workers trained.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np

from forge.cli.output import print_json, print_table, shorten
from forge.embedding.service import EmbeddingService
from forge.errors import ConfigError, ForgeError
from forge.settings import Settings
from forge.training.versions import CANDIDATE, CHAMPION, ModelVersions, VersionInfo


def add_models_parser(sub: Any) -> None:
    models = sub.add_parser("models", help="trained models in the MLflow model registry")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", help="models with their latest version and champion")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=run_list)
    show = models_sub.add_parser("show", help="a model's versions, aliases and metrics")
    show.add_argument("model")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=run_show)
    promote = models_sub.add_parser("promote", help="make a version the champion")
    promote.add_argument("model")
    promote.add_argument("version", type=_version_number)
    promote.set_defaults(run=run_promote)


def add_predict_parser(sub: Any) -> None:
    predict = sub.add_parser("predict", help="label texts or vectors with a trained model")
    predict.add_argument("model", help="MODEL, MODEL@ALIAS or MODEL@VERSION (default champion)")
    given = predict.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", action="append", help="a text to embed and label (repeat)")
    given.add_argument(
        "--vector", action="append", type=_vector, help="a vector: 0.1,0.2,... or [...] (repeat)"
    )
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(run=run_predict)


# ---------------------------------------------------------------------- models


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    with _model_versions(settings) as versions:
        rows = [_summary(versions, name) for name in versions.models()]
    if args.json:
        print_json(rows)
        return 0
    headers = ["model", "latest", CHAMPION, CANDIDATE, "task", "metric", "value"]
    print_table(headers, [[row[h] for h in headers] for row in rows])
    return 0


def run_show(args: argparse.Namespace, settings: Settings) -> int:
    with _model_versions(settings) as versions:
        rows = [_version_row(v, versions.metrics(v)) for v in versions.all(args.model)]
    if args.json:
        print_json({"model": args.model, "versions": rows})
        return 0
    table = [
        [
            r["version"],
            ",".join(r["aliases"]),
            r["task"],
            _metric_text(r["primary_metric"], r["metrics"]),
            r["created_at"][:19],
            r["run_id"],
            shorten(r["request_id"], 40),
        ]
        for r in rows
    ]
    print_table(["version", "aliases", "task", "metric", "created", "run", "request"], table)
    return 0


def run_promote(args: argparse.Namespace, settings: Settings) -> int:
    from forge.training.promotion import promote

    with _model_versions(settings) as versions:
        version = promote(versions, args.model, args.version)
    print(f"{version.model} version {version.version} is now the {CHAMPION}")
    return 0


# ---------------------------------------------------------------------- predict


def run_predict(args: argparse.Namespace, settings: Settings) -> int:
    from forge.training.service import TrainingService

    name, _, ref = args.model.partition("@")
    with _mlflow_errors():
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
    # A one-shot command: no Redis embedding cache to share.
    embedding = EmbeddingService.from_settings(settings, None)
    embedder = embedding.embedder(version.embedding_model)
    return embedder.encode(texts, settings.max_batch_size)


# ---------------------------------------------------------------------- helpers


@contextmanager
def _mlflow_errors() -> Iterator[None]:
    """MLflow's own errors (server unreachable, bad URI) as one line, not a traceback."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise ForgeError(f"MLflow: {exc.message.splitlines()[0]}") from None


@contextmanager
def _model_versions(settings: Settings) -> Iterator[ModelVersions]:
    from forge.training.tracking import connect

    with _mlflow_errors():
        yield ModelVersions(connect(settings))


def _summary(versions: ModelVersions, name: str) -> dict[str, Any]:
    aliases = versions.aliases(name)
    latest = versions.latest(name)
    shown = versions.get(name, aliases[CHAMPION]) if CHAMPION in aliases else latest
    metric = shown.primary_metric if shown else ""
    value = versions.metrics(shown).get(metric) if shown else None
    return {
        "model": name,
        "latest": latest.version if latest else None,
        CHAMPION: aliases.get(CHAMPION),
        CANDIDATE: aliases.get(CANDIDATE),
        "task": shown.task if shown else "",
        "metric": metric,
        "value": None if value is None else round(value, 4),
    }


def _version_row(version: VersionInfo, metrics: dict[str, float]) -> dict[str, Any]:
    created = datetime.fromtimestamp(version.created_at_ms / 1000, UTC)
    return {
        "version": version.version,
        "aliases": version.aliases,
        "task": version.task,
        "primary_metric": version.primary_metric,
        "metrics": metrics,
        "run_id": version.run_id,
        "request_id": version.request_id,
        "collection": version.collection,
        "created_at": created.isoformat(),
        "artifact_uri": version.source,
    }


def _metric_text(name: str, metrics: dict[str, float]) -> str:
    value = metrics.get(name)
    return f"{name}={value:.4f}" if value is not None else name


def _version_number(value: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise argparse.ArgumentTypeError(f"not a version number: {value!r}")
    return int(value)


def _vector(value: str) -> list[float]:
    text = value.strip().removeprefix("[").removesuffix("]")
    try:
        numbers = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {value!r}") from None
    if not numbers or not all(np.isfinite(numbers)):
        raise argparse.ArgumentTypeError(f"not a finite, non-empty vector: {value!r}")
    return numbers


def _vector_text(vector: list[float]) -> str:
    return msgspec.json.encode(vector).decode()
