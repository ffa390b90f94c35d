"""``forge models upgrade`` turns versions registered before Forge logged MLflow models
into MLflow models in place; and only versions trained on vectors an embedding model
made record that model. Real MLflow (a SQLite store of this module's); the tag test
also real Redis and PostgreSQL.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest

from consumers.new_data import NewDataHandler
from consumers.once import Once
from consumers.training import TrainingHandler
from forge.cli.main import main
from forge.embedding.model import Embedder
from forge.embedding.model_cache import ModelCache
from forge.embedding.service import EmbeddingService
from forge.events import TrainingRequest
from forge.runtime.context import Context
from forge.runtime.handlers import Message, Succeeded
from forge.settings import Settings
from forge.training.base import Dataset
from forge.training.service import TrainingService
from forge.training.tasks import get_trainer, parse_params
from forge.training.tracking import TrainingRun
from forge.training.versions import (
    CHAMPION,
    TAG_COLLECTION,
    TAG_PRIMARY_METRIC,
    TAG_REQUEST_ID,
    TAG_TASK,
)
from forge.vectorstore import VectorStore
from tests.support.events import publish
from tests.support.workers import drain, make_worker

Cli = Callable[..., tuple[int, str, str]]
INCREMENTAL = {"label_field": "digit", "epochs": 2}


@pytest.fixture
def cli(
    store: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Cli:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(store.mlflow_tracking_uri))
    monkeypatch.setenv("FORGE_HOME", str(store.home_dir))

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def old_version(service: TrainingService, data: Dataset, task: str, params: dict[str, Any]) -> str:
    """A version as Forge registered them before MLflow models: the model's own files
    alone, in its run's ``model`` folder."""
    name = f"old_{uuid.uuid4().hex[:10]}"
    trainer = get_trainer(task)
    request = TrainingRequest(id="old", model=name, task=task, collection="c", params=params)
    model = service.train_model(request, data, trainer, parse_params(trainer, params), None)
    tags = {TAG_REQUEST_ID: "old", TAG_TASK: task, TAG_COLLECTION: "c"}
    tags[TAG_PRIMARY_METRIC] = model.primary_metric
    run = TrainingRun.start(service.client, name, tags, {})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save(folder)
        service.client.log_artifacts(run.run_id, str(folder), "model")
    service.client.set_terminated(run.run_id, "FINISHED")
    version = service.versions.register(name, f"{run.artifact_uri}/model", run.run_id, tags)
    service.versions.set_alias(name, CHAMPION, version.version)
    return name


def forge_labels(service: TrainingService, name: str, vectors: np.ndarray[Any, Any]) -> list[str]:
    model, _ = service.load(name)
    return [p.label for p in model.predict(vectors)]


def pyfunc_labels(uri: str, given: Any) -> list[str]:
    return [str(label) for label in mlflow.pyfunc.load_model(uri).predict(given)["label"]]


def test_upgrade_makes_an_old_version_an_mlflow_model_in_place(
    service: TrainingService, digits: Dataset, cli: Cli, tmp_path: Path
) -> None:
    name = old_version(service, digits, "incremental", INCREMENTAL)
    vectors = digits.vectors[:40]
    expected = forge_labels(service, name, vectors)  # Forge still loads the old layout
    before = service.versions.resolve(name)
    champion = f"models:/{name}@{CHAMPION}"
    with pytest.raises(mlflow.exceptions.MlflowException, match="MLmodel"):
        mlflow.pyfunc.load_model(champion)

    code, out, _ = cli("models", "upgrade", name, "--dry-run", "--json")
    assert code == 0
    assert [(r["version"], r["action"]) for r in json.loads(out)] == [(1, "would upgrade")]
    with pytest.raises(mlflow.exceptions.MlflowException, match="MLmodel"):
        mlflow.pyfunc.load_model(champion)

    code, out, _ = cli("models", "upgrade", name, "--json")
    assert code == 0
    assert [(r["version"], r["action"]) for r in json.loads(out)] == [(1, "upgraded")]
    after = service.versions.resolve(name)
    assert (after.version, after.source, after.aliases) == (1, before.source, [CHAMPION])
    assert pyfunc_labels(champion, vectors) == expected
    assert pyfunc_labels(f"models:/{name}/1", pd.DataFrame(vectors)) == expected
    # A process without the old copy cached reads the files out of the MLflow model.
    fresh = TrainingService.from_settings(service.settings.replace(home_dir=tmp_path))
    assert forge_labels(fresh, name, vectors) == expected

    code, out, _ = cli("models", "upgrade", name, "--json")
    assert [r["action"] for r in json.loads(out)] == ["unchanged"]
    code, out, _ = cli("models", "upgrade", name)
    assert code == 0
    assert "already an MLflow model" in out
    code, _, err = cli("models", "upgrade", "nope")
    assert (code, err) == (1, "forge: error: no model named 'nope'\n")


def test_upgrade_drops_an_embedding_model_that_cannot_have_made_the_vectors(
    service: TrainingService, digits: Dataset, cli: Cli, embedder: Embedder
) -> None:
    """Before raw-vector collections stopped passing for embedded ones, their versions
    were tagged with the collection's model: 64-d digits are not MiniLM's 384-d."""
    name = old_version(service, digits, "clustering", {"n_clusters": 10, "max_iter": 3})
    version = service.versions.resolve(name)
    service.client.set_model_version_tag(
        name, str(version.version), "forge.embedding_model", embedder.name
    )
    code, out, _ = cli("models", "upgrade", name, "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert row["action"] == "upgraded"
    assert "dropped" in row["detail"]
    assert service.versions.resolve(name).embedding_model is None
    expected = forge_labels(service, name, digits.vectors[:20])
    assert pyfunc_labels(f"models:/{name}/1", digits.vectors[:20]) == expected


# ---------------------------------------------------------------------- the embedding tag


def test_only_versions_trained_on_embedded_rows_record_the_embedding_model(
    ctx: Context,
    vector_store: VectorStore,
    collection_name: str,
    embedder: Embedder,
    service: TrainingService,
    digits: Dataset,
) -> None:
    models = ModelCache.from_settings(ctx.settings)
    models.get_or_load(f"embedder:{embedder.name}", lambda: embedder, lambda e: e.size_bytes)
    embedding = EmbeddingService(ctx.settings, models, None)
    raw, texts = collection_name, f"{collection_name}_texts"
    vectors = [
        {"id": f"r{i}", "vector": digits.vectors[i].tolist(), "metadata": digits.metadata[i]}
        for i in range(200)
    ]
    topics = {"billing": "I want a refund for order {}", "login": "I cannot log in to account {}"}
    sentences = [
        {"id": f"t{topic}{i}", "text": text.format(i), "metadata": {"topic": topic}}
        for topic, text in topics.items()
        for i in range(12)
    ]
    for event_id, collection, records in (("raw", raw, vectors), ("texts", texts, sentences)):
        event = {"type": "new-data", "id": event_id, "collection": collection, "records": records}
        publish(ctx.redis, ctx.keys.new_data, event)
    handler = TrainingHandler(ctx, Once(lambda: vector_store), Once(lambda: service))
    try:
        drain(
            make_worker(ctx, NewDataHandler(ctx.settings, lambda: vector_store, embedding)), ctx, 2
        )
        # Both collections record a model: texts sent later are embedded with it.
        assert vector_store.collection(raw).model == embedder.name
        on_raw = handle(handler, raw, {"label_field": "digit", "epochs": 2})
        on_texts = handle(handler, texts, {"label_field": "topic", "epochs": 2, "min_rows": 10})
    finally:
        vector_store.drop_collection(texts)
    assert service.versions.resolve(on_raw).embedding_model is None
    assert service.versions.resolve(on_texts).embedding_model == embedder.name


def handle(handler: TrainingHandler, collection: str, params: dict[str, Any]) -> str:
    name = f"m_{uuid.uuid4().hex[:10]}"
    request = TrainingRequest(
        id=f"r-{name}", model=name, task="classifier", collection=collection, params=params
    )
    outcome = handler.handle(Message(request, "training-requests", "1-0", 1))
    assert isinstance(outcome, Succeeded), outcome
    return name
