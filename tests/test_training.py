"""Training end to end: real Redis, real PostgreSQL with pgvector, real MLflow (SQLite).

The digits data set (8x8 images as 64-d vectors, labels in metadata) stands in for an
embedded collection: small, bundled with scikit-learn, and easy to classify.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits

from consumers import register
from consumers.once import Once
from consumers.training import TrainingHandler
from forge.cli.main import main
from forge.embedding.model import Embedder
from forge.events import (
    EVENT_FIELD,
    Completion,
    ModelVersion,
    TrainingProgress,
    TrainingRequest,
    decode_as,
)
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, HandlerSpec
from forge.runtime.worker import Worker
from forge.settings import Settings
from forge.training.admission import GpuAdmission
from forge.training.base import Dataset, TrainingControls
from forge.training.classifier import ClassifierTrainer
from forge.training.service import TrainingService
from forge.training.tracking import TrainingRun
from forge.training.versions import CANDIDATE, CHAMPION, ModelVersions
from forge.vectorstore import Row, VectorStore
from tests.support.events import publish
from tests.support.metrics import sample
from tests.support.nvml import FakeNvml, MiB
from tests.support.redis_helpers import TEST_REDIS_URL, running, wait_for
from tests.support.workers import dead_letters

REPO = Path(__file__).resolve().parents[1]
# Small and quick: digits reach about 0.97 validation accuracy in a few epochs.
CLASSIFIER = {"label_field": "digit", "hidden_dim": 64, "epochs": 8, "batch_size": 64}
WORKER = [sys.executable, "-m", "forge.cli.main", "worker", "--http-port", "0"]
POOR = {**CLASSIFIER, "epochs": 1, "learning_rate": 1e-5, "hidden_dim": 2}


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def settings(settings: Settings, mlflow_uri: str, pg_url: str) -> Settings:
    return settings.replace(mlflow_tracking_uri=mlflow_uri, postgres_url=pg_url)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target


def load_rows(
    store: VectorStore,
    collection: str,
    vectors: np.ndarray[Any, Any],
    labels: list[Any],
    prefix: str = "d",
    model: str | None = None,
) -> list[str]:
    ids = [f"{prefix}{i}" for i in range(len(vectors))]
    rows = [
        Row(i, v, "load", metadata={} if label is None else {"digit": int(label)}, model=model)
        for i, v, label in zip(ids, vectors, labels, strict=True)
    ]
    store.write_batch(collection, rows, ["load"], f"test:{uuid.uuid4().hex}", model=model)
    return ids


@pytest.fixture
def collection(
    vector_store: VectorStore,
    collection_name: str,
    digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
) -> str:
    vectors, labels = digits
    load_rows(vector_store, collection_name, vectors, list(labels))
    return collection_name


def request(
    event_id: str, model: str, collection: str, task: str = "classifier", **fields: Any
) -> dict[str, Any]:
    params = fields.pop("params", CLASSIFIER)
    return {
        "type": "training-request",
        "id": event_id,
        "model": model,
        "task": task,
        "collection": collection,
        "params": params,
        **fields,
    }


# ---------------------------------------------------------------------- helpers


def read(ctx: Context, stream: str, event_type: type[Any]) -> list[Any]:
    return [decode_as(event_type, f[EVENT_FIELD]) for _, f in ctx.redis.xrange(stream)]


def completions(ctx: Context) -> list[Completion]:
    return read(ctx, ctx.keys.completions, Completion)


def model_versions(ctx: Context) -> list[ModelVersion]:
    return read(ctx, ctx.keys.model_versions, ModelVersion)


def pending(ctx: Context, stream: str) -> int:
    return int(ctx.redis.xpending(stream, ctx.keys.group)["pending"])


def worker(ctx: Context) -> Worker:
    """A worker with Forge's real handler registration (new-data and training)."""
    handlers = HandlerRegistry()
    register(handlers, ctx)
    made = Worker(ctx, handlers)
    made.ctx.broker.ensure_groups(made.streams)
    return made


def run_until(ctx: Context, n_completions: int, timeout_s: float = 60) -> list[Completion]:
    with running(worker(ctx)):
        wait_for(lambda: len(completions(ctx)) >= n_completions, timeout_s)
    return completions(ctx)


def train(ctx: Context, event: dict[str, Any]) -> Completion:
    """Publish a training request and wait for its completion."""
    before = len(completions(ctx))
    publish(ctx.redis, ctx.keys.training_requests, event)
    return run_until(ctx, before + 1)[-1]


# ---------------------------------------------------------------------- tests


def test_a_classifier_request_registers_one_version_and_announces_it_once(
    ctx: Context, collection: str, model: str, versions: ModelVersions
) -> None:
    done = train(ctx, request("r1", model, collection))
    assert done.status == "succeeded", done.error
    assert done.result["model_version"] == 1
    assert done.result["metrics"]["val_accuracy"] > 0.9
    assert done.result["aliases"] == [CHAMPION]
    (announced,) = model_versions(ctx)
    assert (announced.model, announced.model_version, announced.source_id) == (model, 1, "r1")
    assert announced.metrics == done.result["metrics"]
    progress = read(ctx, ctx.keys.training_progress, TrainingProgress)
    assert [p.epoch for p in progress][:2] == [1, 2]
    assert {p.source_id for p in progress} == {"r1"}
    last = progress[-1]
    ratio = sample(ctx.metrics, "forge_training_progress_ratio", model=model)
    assert ratio == last.epoch / last.epochs
    assert sample(ctx.metrics, "forge_training_loss", model=model) == last.loss

    (version,) = versions.all(model)
    run = versions.client.get_run(version.run_id)
    assert run.data.tags["forge.request_id"] == "r1"
    assert run.data.tags["forge.event_stream"] == ctx.keys.training_requests
    assert run.data.tags["forge.task"] == "classifier"
    assert run.data.tags["forge.collection"] == collection
    assert run.data.params["hidden_dim"] == "64"
    history = versions.client.get_metric_history(version.run_id, "epoch_loss")
    assert [m.step for m in history][:2] == [1, 2]
    assert version.request_id == "r1"
    (logged,) = run.outputs.model_outputs  # the run's LoggedModel is the version
    assert version.source == versions.client.get_logged_model(logged.model_id).artifact_location

    again = train(ctx, request("r1", model, collection))
    assert again.duplicate
    assert again.result["model_version"] == 1
    assert len(versions.all(model)) == 1
    assert len(model_versions(ctx)) == 1


@pytest.mark.slow
def test_a_worker_killed_between_register_and_publish_leaves_one_version_and_one_event(
    ctx: Context, collection: str, model: str, versions: ModelVersions, pg_url: str
) -> None:
    publish(ctx.redis, ctx.keys.training_requests, request("r1", model, collection))
    env = dict(
        os.environ,
        REDIS_URL=TEST_REDIS_URL,
        POSTGRES_URL=pg_url,
        MLFLOW_TRACKING_URI=str(ctx.settings.mlflow_tracking_uri),
        FORGE_STREAM_PREFIX=ctx.settings.stream_prefix,
        FORGE_HOME=str(ctx.settings.home_dir),
        FORGE_READ_BLOCK_S="0.05",
    )
    proc = subprocess.run(
        [*WORKER, "--consumers", "tests.support.consumers:register_crash_after_register"],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len(versions.all(model)) == 1  # registered...
    assert model_versions(ctx) == []  # ...but never announced
    assert pending(ctx, ctx.keys.training_requests) == 1

    ctx = replace(ctx, settings=ctx.settings.replace(claim_min_idle_s=0.2))
    (done,) = run_until(ctx, 1)
    assert done.status == "succeeded"
    assert done.deliveries == 2
    assert done.result["model_version"] == 1
    (announced,) = model_versions(ctx)
    assert announced.model_version == 1
    assert len(versions.all(model)) == 1
    assert pending(ctx, ctx.keys.training_requests) == 0


def test_a_redelivery_marks_runs_left_running_by_a_dead_worker_killed(
    settings: Settings, model: str, digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
) -> None:
    service = TrainingService.from_settings(settings)
    stale = TrainingRun.start(service.client, model, {"forge.request_id": "r1"}, {})
    vectors, labels = digits
    data = Dataset(
        ids=[str(i) for i in range(len(vectors))],
        vectors=vectors,
        metadata=[{"digit": int(label)} for label in labels],
    )
    event = TrainingRequest(
        id="r1", model=model, task="classifier", collection="c", params=CLASSIFIER
    )
    fitted = service.fit(event, data, redelivery=True)
    assert service.client.get_run(stale.run_id).info.status == "KILLED"
    assert service.client.get_run(fitted.run.run_id).info.status == "FINISHED"


def test_a_training_past_its_timeout_fails_saying_so(
    ctx: Context, collection: str, model: str, versions: ModelVersions
) -> None:
    params = {**CLASSIFIER, "epochs": 100_000, "patience": 100_000}
    done = train(ctx, request("slow", model, collection, params=params, timeout_s=0.5))
    assert done.status == "failed"
    assert done.error is not None
    assert done.error.type == "TrainingTimeout"
    assert "timed out" in done.error.message
    assert done.deliveries == 1
    assert dead_letters(ctx) == []
    assert versions.latest(model) is None
    (run,) = versions.client.search_runs(
        [versions.client.get_experiment_by_name(f"forge/{model}").experiment_id]
    )
    assert run.info.status == "FAILED"


def test_a_training_that_fits_on_no_gpu_runs_on_the_cpu_where_configured(
    ctx: Context,
    collection: str,
    model: str,
    vector_store: VectorStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GPU admission in the real handler, with a stand-in NVML whose only GPU has 10 MiB
    free: with FORGE_GPU_ADMISSION_CPU_FALLBACK the classifier is told to train on the
    CPU, and does, without waiting."""
    settings = ctx.settings.replace(gpu_admission_cpu_fallback=True)
    ctx = replace(ctx, settings=settings)
    gate = GpuAdmission(
        settings,
        nvml=FakeNvml([10 * MiB]),
        cuda_available=lambda: True,
        sleep=lambda s: pytest.fail("a fallback must not wait"),
    )
    devices: list[str | None] = []
    original = ClassifierTrainer.fit

    def fit(self: ClassifierTrainer, rows: Any, p: Any, controls: TrainingControls) -> Any:
        devices.append(controls.device)
        return original(self, rows, p, controls)

    monkeypatch.setattr(ClassifierTrainer, "fit", fit)
    service = Once(lambda: TrainingService.from_settings(settings, admission=gate))
    handler = TrainingHandler(ctx, Once(lambda: vector_store), service)
    handlers = HandlerRegistry()
    handlers.register(HandlerSpec("training-requests", TrainingRequest, handler, max_batch_size=1))
    made = Worker(ctx, handlers)
    made.ctx.broker.ensure_groups(made.streams)
    publish(ctx.redis, ctx.keys.training_requests, request("r1", model, collection))
    with running(made):
        wait_for(lambda: len(completions(ctx)) == 1, 60)
    (done,) = completions(ctx)
    assert done.status == "succeeded", done.error
    assert devices == ["cpu"]
    assert sample(ctx.metrics, "forge_training_cpu_fallbacks_total", model=model) == 1


def test_requests_that_cannot_be_done_fail_without_retries_or_dead_letters(
    ctx: Context,
    collection: str,
    model: str,
    vector_store: VectorStore,
    digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
) -> None:
    sparse = f"{collection}_sparse"
    vectors, labels = digits
    load_rows(vector_store, sparse, vectors[:50], [*labels[:5], *([None] * 45)])
    cases = {
        "task": request("task", model, collection, task="regression"),
        "param": request("param", model, collection, params={**CLASSIFIER, "epoks": 3}),
        "collection": request("collection", model, "no_such_collection"),
        "rows": request("rows", model, sparse),
        "warm": request("warm", model, collection, warm_start_from="champion"),
    }
    try:
        for event in cases.values():
            publish(ctx.redis, ctx.keys.training_requests, event)
        done = {c.source_id: c for c in run_until(ctx, len(cases))}
    finally:
        vector_store.drop_collection(sparse)
    assert {c.status for c in done.values()} == {"failed"}
    assert {c.deliveries for c in done.values()} == {1}
    errors = {k: c.error.message for k, c in done.items() if c.error is not None}
    assert "unknown task 'regression'" in errors["task"]
    assert "epoks" in errors["param"]
    assert "no_such_collection" in errors["collection"]
    assert "too few labelled rows" in errors["rows"]
    assert "no model named" in errors["warm"]
    assert dead_letters(ctx) == []
    assert pending(ctx, ctx.keys.training_requests) == 0
    assert model_versions(ctx) == []


def test_a_better_version_becomes_champion_and_a_worse_one_stays_candidate(
    ctx: Context, collection: str, model: str, versions: ModelVersions
) -> None:
    assert train(ctx, request("poor", model, collection, params=POOR)).status == "succeeded"
    assert versions.aliases(model) == {CHAMPION: 1}  # the first version has no rival
    good = train(ctx, request("good", model, collection))
    assert good.result["aliases"] == [CHAMPION]
    assert versions.aliases(model) == {CHAMPION: 2}
    worse = train(ctx, request("worse", model, collection, params=POOR))
    assert worse.result["aliases"] == [CANDIDATE]
    assert versions.aliases(model) == {CHAMPION: 2, CANDIDATE: 3}
    forced = train(ctx, request("forced", model, collection, params=POOR, promote="always"))
    assert forced.result["aliases"] == [CHAMPION]
    assert versions.aliases(model) == {CHAMPION: 4}  # the older candidate is stale
    never = train(ctx, request("never", model, collection, promote="never"))
    assert never.result["aliases"] == [CANDIDATE]
    assert [v.aliases for v in model_versions(ctx)] == [
        [CHAMPION],
        [CHAMPION],
        [CANDIDATE],
        [CHAMPION],
        [CANDIDATE],
    ]


def test_new_data_naming_a_model_retrains_it_on_the_new_records(
    ctx: Context,
    collection: str,
    model: str,
    versions: ModelVersions,
    digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
) -> None:
    params = {"label_field": "digit", "epochs": 3, "classes": [str(d) for d in range(10)]}
    first = train(ctx, request("v1", model, collection, task="incremental", params=params))
    assert first.status == "succeeded", first.error
    vectors, labels = digits
    records = [
        {"id": f"new{i}", "vector": vectors[i].tolist(), "metadata": {"digit": int(labels[i])}}
        for i in range(300)
    ]
    event = {
        "type": "new-data",
        "id": "batch-7",
        "collection": collection,
        "records": records,
        "retrain": model,
    }
    publish(ctx.redis, ctx.keys.new_data, event)
    # The new-data completion, then the training request it published.
    done = {c.source_id: c for c in run_until(ctx, 3)}
    retrain_id = f"retrain:batch-7:{model}"
    assert done["batch-7"].result["retrain"] == {"request_id": retrain_id}
    assert done[retrain_id].status == "succeeded", done[retrain_id].error
    assert done[retrain_id].result["model_version"] == 2
    v1, v2 = versions.resolve(model, "1"), versions.resolve(model, "2")
    assert v2.request_id == retrain_id
    run = versions.client.get_run(v2.run_id)
    assert run.data.params["rows"] == "300"
    assert run.data.params["warm_start_from"] == "latest"
    assert versions.metrics(v2)["warm_started"] == 1.0
    assert versions.metrics(v2)["rows_seen"] > versions.metrics(v1)["rows_seen"]
    assert [v.model_version for v in model_versions(ctx)] == [1, 2]


def test_clustering_writes_each_rows_cluster_into_its_metadata(
    ctx: Context, collection: str, model: str, vector_store: VectorStore
) -> None:
    params = {"n_clusters": 10, "max_iter": 5}
    done = train(ctx, request("k", model, collection, task="clustering", params=params))
    assert done.status == "succeeded", done.error
    field = done.result["cluster_field"]
    assert field == f"{model}_cluster"
    stored = vector_store.fetch(collection, ["d0", "d1"])
    assert all(0 <= r.metadata[field] < 10 for r in stored.values())
    assert all("digit" in r.metadata for r in stored.values())  # merged, not replaced


# ---------------------------------------------------------------------- CLI


@pytest.fixture
def cli(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(settings.mlflow_tracking_uri))
    monkeypatch.setenv("FORGE_HOME", str(settings.home_dir))

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_models_commands_list_show_and_promote(
    ctx: Context,
    collection: str,
    model: str,
    cli: Callable[..., tuple[int, str, str]],
) -> None:
    train(ctx, request("a", model, collection))
    train(ctx, request("b", model, collection, promote="never"))
    code, out, _ = cli("models", "list")
    assert code == 0
    (line,) = [row for row in out.splitlines() if row.startswith(model)]
    assert line.split()[:5] == [model, "2", "1", "2", "classifier"]
    assert "val_macro_f1" in line
    code, out, _ = cli("models", "show", model)
    assert code == 0
    assert "candidate" in out.splitlines()[1]  # newest first
    code, out, _ = cli("models", "promote", model, "2")
    assert (code, out.strip()) == (0, f"{model} version 2 is now the champion")
    code, out, _ = cli("models", "show", model, "--json")
    versions = {v["version"]: v for v in json.loads(out)["versions"]}
    assert versions[2]["aliases"] == [CHAMPION]
    assert versions[1]["aliases"] == []
    assert versions[1]["request_id"] == "a"
    code, _, err = cli("models", "show", "nope")
    assert code == 1
    assert err.strip() == "forge: error: no model named 'nope'"
    code, _, err = cli("models", "promote", model, "9")
    assert code == 1
    assert f"model {model!r} has no version 9" in err


def test_predict_labels_vectors_and_texts(
    ctx: Context,
    collection: str,
    model: str,
    cli: Callable[..., tuple[int, str, str]],
    digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
    vector_store: VectorStore,
    embedder: Embedder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    train(ctx, request("a", model, collection))
    vectors, labels = digits
    given = [arg for i in range(20) for arg in ("--vector", ",".join(map(str, vectors[i])))]
    code, out, _ = cli("predict", f"{model}@champion", *given, "--json")
    assert code == 0
    predictions = json.loads(out)
    right = sum(p["label"] == str(label) for p, label in zip(predictions, labels, strict=False))
    assert right >= 17
    assert {p["version"] for p in predictions} == {1}
    vector = given[1]
    code, _, err = cli("predict", f"{model}@7", "--vector", vector)
    assert (code, err.strip()) == (1, f"forge: error: model {model!r} has no version 7")
    with pytest.raises(SystemExit) as usage:
        cli("predict", model, "--vector", "1,x")
    assert usage.value.code == 2

    # A text collection: predict embeds the query with the collection's model.
    texts = [f"I want a refund for order {i}" for i in range(15)]
    texts += [f"I cannot log in to account {i}" for i in range(15)]
    topics = ["billing"] * 15 + ["login"] * 15
    text_collection, text_model = f"{collection}_texts", f"{model}_texts"
    encoded = embedder.encode(texts, 32)
    ids = [f"t{i}" for i in range(len(texts))]
    rows = [
        Row(i, v, "load", metadata={"topic": t}, model=embedder.name)
        for i, v, t in zip(ids, encoded, topics, strict=True)
    ]
    vector_store.write_batch(text_collection, rows, ["load"], "test:texts", model=embedder.name)
    try:
        params = {**CLASSIFIER, "label_field": "topic", "epochs": 20}
        done = train(ctx, request("t", text_model, text_collection, params=params))
        assert done.status == "succeeded", done.error
    finally:
        vector_store.drop_collection(text_collection)
    from forge.embedding.service import EmbeddingService

    loaded = EmbeddingService.from_settings(ctx.settings, None)
    loaded.models.get_or_load(f"embedder:{embedder.name}", lambda: embedder, lambda e: 1)
    monkeypatch.setattr(EmbeddingService, "from_settings", lambda *a, **k: loaded)
    code, out, _ = cli("predict", text_model, "--text", "please refund my money")
    assert code == 0
    assert "billing" in out.splitlines()[2]
