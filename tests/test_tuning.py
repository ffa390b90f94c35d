"""Hyperparameter search end to end: real Redis, PostgreSQL (the study storage and the
collection), MLflow (SQLite), Optuna; the digits data set, few trials, short trainings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import optuna
import pytest
from sklearn.datasets import load_digits
from sqlalchemy import text

from consumers import register
from forge.events import (
    EVENT_FIELD,
    Completion,
    ModelVersion,
    TrainingProgress,
    TrainingRequest,
    Tune,
    decode_as,
)
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry
from forge.runtime.worker import Worker
from forge.settings import Settings
from forge.training.base import Dataset
from forge.training.service import TrainingService
from forge.training.tuning import trial as trial_module
from forge.training.tuning.search import TuneService
from forge.training.tuning.storage import open_storage
from forge.training.tuning.study import study_name
from forge.training.versions import ModelVersions
from forge.vectorstore import Row, VectorStore
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.events import publish
from tests.support.redis_helpers import TEST_REDIS_URL, running, wait_for
from tests.support.workers import dead_letters

FAST = {"label_field": "digit", "hidden_dim": 32, "epochs": 4, "batch_size": 128}
SPACE = {
    "learning_rate": {"low": 1e-3, "high": 1e-1, "log": True},
    "hidden_dim": {"choices": [16, 32]},
}


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def settings(settings: Settings, mlflow_uri: str, pg_url: str) -> Settings:
    return settings.replace(mlflow_tracking_uri=mlflow_uri, postgres_url=pg_url, tune_poll_s=0.05)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target


@pytest.fixture
def collection(
    vector_store: VectorStore,
    collection_name: str,
    digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
) -> str:
    vectors, labels = digits
    rows = [
        Row(f"d{i}", v, "load", metadata={"digit": int(label)})
        for i, (v, label) in enumerate(zip(vectors, labels, strict=True))
    ]
    vector_store.write_batch(collection_name, rows, ["load"], f"test:{uuid.uuid4().hex}")
    return collection_name


@pytest.fixture
def storage(settings: Settings, pg_url: str) -> Iterator[optuna.storages.RDBStorage]:
    opened = open_storage(pg_url, settings)
    yield opened
    opened.remove_session()
    opened.engine.dispose()


def tune_request(event_id: str, model: str, collection: str, **tune: Any) -> dict[str, Any]:
    return {
        "type": "training-request",
        "id": event_id,
        "model": model,
        "task": "classifier",
        "collection": collection,
        "params": FAST,
        "tune": {"trials": 4, "space": SPACE, **tune},
    }


# ---------------------------------------------------------------------- helpers


def read(ctx: Context, stream: str, event_type: type[Any]) -> list[Any]:
    return [decode_as(event_type, f[EVENT_FIELD]) for _, f in ctx.redis.xrange(stream)]


def completions(ctx: Context) -> list[Completion]:
    return read(ctx, ctx.keys.completions, Completion)


def worker(ctx: Context) -> Worker:
    handlers = HandlerRegistry()
    register(handlers, ctx)
    made = Worker(ctx, handlers)
    made.ctx.broker.ensure_groups(made.streams)
    return made


def studies_of(storage: optuna.storages.RDBStorage, model: str) -> list[str]:
    names = optuna.get_all_study_names(storage)
    return [n for n in names if n.startswith(f"forge/{model}/")]


# ---------------------------------------------------------------------- tests


def test_a_study_runs_over_the_trials_stream_on_two_workers_and_registers_one_version(
    ctx: Context,
    collection: str,
    model: str,
    versions: ModelVersions,
    storage: optuna.storages.RDBStorage,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    trials = 6
    publish(ctx.redis, ctx.keys.training_requests, tune_request("t1", model, collection, trials=6))
    second = replace(ctx, consumer=f"{ctx.consumer}-2")

    def trial_entries() -> list[Completion]:
        return [c for c in completions(ctx) if c.source_stream == ctx.keys.trials]

    with running(worker(ctx)), running(worker(second)):
        wait_for(lambda: any(c.source_id == "t1" for c in completions(ctx)), 300)
        wait_for(lambda: len(trial_entries()) == trials, 120)
    (done,) = [c for c in completions(ctx) if c.source_id == "t1"]
    assert done.status == "succeeded", done.error
    summary = done.result["tune"]
    counts = summary["trials"]
    assert counts["completed"] + counts["pruned"] + counts["failed"] == trials
    assert counts["completed"] >= 1
    assert counts["retried"] == 0
    assert summary["metric"] == "val_macro_f1"
    assert summary["direction"] == "maximize"
    assert set(summary["best_params"]) == set(SPACE)

    # Exactly one version, announced once: the best trial's model, with its params.
    (announced,) = read(ctx, ctx.keys.model_versions, ModelVersion)
    (version,) = versions.all(model)
    assert announced.model_version == version.version == done.result["model_version"]
    assert version.params == {**FAST, **summary["best_params"]}
    assert version.tags["forge.trial"] == str(summary["best_trial"])
    assert versions.metrics(version)["val_macro_f1"] == pytest.approx(summary["best_value"])

    # Every trial is a child run of the study's run; the study is the only one.
    client = versions.client
    experiment = client.get_experiment_by_name(f"forge/{model}").experiment_id
    parent = summary["parent_run_id"]
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == trials
    states = sorted(r.data.tags["forge.trial_state"] for r in children)
    assert states.count("complete") == counts["completed"]
    assert client.get_run(parent).info.status == "FINISHED"
    assert studies_of(storage, model) == [study_name(decode_request(ctx))]

    # Trial entries all settle, whichever worker ran them; progress names the trial.
    assert {c.status for c in trial_entries()} == {"succeeded"}
    progress = read(ctx, ctx.keys.training_progress, TrainingProgress)
    assert {p.trial for p in progress} <= set(range(trials))
    assert {p.source_id for p in progress} == {"t1"}

    # The same request again is answered from its first outcome: no second version.
    publish(ctx.redis, ctx.keys.training_requests, tune_request("t1", model, collection, trials=6))
    with running(worker(ctx)):
        wait_for(lambda: sum(c.source_id == "t1" for c in completions(ctx)) == 2, 60)
    assert len(versions.all(model)) == 1
    assert len(read(ctx, ctx.keys.model_versions, ModelVersion)) == 1

    # forge tune show prints the study.
    monkeypatch.setenv("POSTGRES_URL", str(ctx.settings.postgres_url))
    monkeypatch.setenv("FORGE_HOME", str(ctx.settings.home_dir))
    code, out, _ = run_cli(capsys, "tune", "show", model, "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["best_trial"] == summary["best_trial"]
    assert shown["best_value"] == pytest.approx(summary["best_value"])
    assert len(shown["trials"]) == trials
    if counts["completed"] >= 2:
        assert set(shown["importances"]) == set(SPACE)
    code, out, _ = run_cli(capsys, "tune", "show", model)
    assert code == 0
    assert f"trial {summary['best_trial']}" in out
    assert "learning_rate" in out
    code, _, err = run_cli(capsys, "tune", "show", "no_such_model")
    assert_one_line_error(code, err, "no hyperparameter search")


def decode_request(ctx: Context) -> TrainingRequest:
    (entry,) = ctx.redis.xrange(ctx.keys.training_requests, count=1)
    return decode_as(TrainingRequest, entry[1][EVENT_FIELD])


def test_a_bad_search_space_fails_the_request_with_the_reason(
    ctx: Context, collection: str, model: str, storage: optuna.storages.RDBStorage
) -> None:
    cases = {
        "unknown": {"space": {"learnin_rate": {"low": 0.1, "high": 0.2}}},
        "reversed": {"space": {"dropout": {"low": 0.5, "high": 0.1}}},
        "extra-key": {"space": {"dropout": {"low": 0.0, "high": 0.5, "step": 0.1}}},
        "refused": {"space": {"dropout": {"low": 0.0, "high": 1.5}}},
        "integer": {"space": {"hidden_dim": {"low": 8.5, "high": 64}}},
        "log": {"space": {"learning_rate": {"low": 0, "high": 0.1, "log": True}}},
        "both": {"space": {"hidden_dim": {"choices": [8], "low": 8, "high": 9}}},
        "metric": {"metric": "auc"},
    }
    for name, tune in cases.items():
        publish(
            ctx.redis, ctx.keys.training_requests, tune_request(name, model, collection, **tune)
        )
    with running(worker(ctx)):
        wait_for(lambda: len(completions(ctx)) == len(cases), 60)
    done = {c.source_id: c for c in completions(ctx)}
    assert {c.status for c in done.values()} == {"failed"}
    assert {c.deliveries for c in done.values()} == {1}
    errors = {k: c.error.message for k, c in done.items() if c.error is not None}
    assert "unknown parameter 'learnin_rate'" in errors["unknown"]
    assert "must be below" in errors["reversed"]
    assert "invalid search space" in errors["extra-key"]
    assert "step" in errors["extra-key"]
    assert "dropout=1.5 is refused" in errors["refused"]
    assert "integer" in errors["integer"]
    assert "positive `low`" in errors["log"]
    assert "not both" in errors["both"]
    assert "unknown metric 'auc'" in errors["metric"]
    assert dead_letters(ctx) == []
    assert ctx.redis.xlen(ctx.keys.trials) == 0
    assert studies_of(storage, model) == []


def test_a_clustering_search_writes_the_best_models_clusters_into_the_rows(
    ctx: Context, collection: str, model: str, vector_store: VectorStore
) -> None:
    event = {
        "type": "training-request",
        "id": "k1",
        "model": model,
        "task": "clustering",
        "collection": collection,
        "params": {"max_iter": 3},
        "tune": {"trials": 2, "space": {"n_clusters": {"low": 2, "high": 4}}},
    }
    publish(ctx.redis, ctx.keys.training_requests, event)
    with running(worker(ctx)):
        wait_for(lambda: any(c.source_id == "k1" for c in completions(ctx)), 120)
    (done,) = [c for c in completions(ctx) if c.source_id == "k1"]
    assert done.status == "succeeded", done.error
    assert done.result["tune"]["metric"] == "silhouette"
    n_clusters = done.result["tune"]["best_params"]["n_clusters"]
    field = done.result["cluster_field"]
    stored = vector_store.fetch(collection, ["d0", "d1", "d2"])
    assert all(0 <= r.metadata[field] < n_clusters for r in stored.values())


@pytest.mark.slow
def test_a_worker_killed_mid_trial_loses_nothing_and_the_trial_counts_once(
    ctx: Context, collection: str, model: str, versions: ModelVersions, pg_url: str
) -> None:
    # Reclaims after 2 s idle; trials beat every second and are stale after two.
    ctx = replace(ctx, settings=ctx.settings.replace(claim_min_idle_s=2.0))
    publish(ctx.redis, ctx.keys.training_requests, tune_request("k1", model, collection))
    env = dict(
        os.environ,
        REDIS_URL=TEST_REDIS_URL,
        POSTGRES_URL=pg_url,
        MLFLOW_TRACKING_URI=str(ctx.settings.mlflow_tracking_uri),
        FORGE_STREAM_PREFIX=ctx.settings.stream_prefix,
        FORGE_HOME=str(ctx.settings.home_dir),
        FORGE_READ_BLOCK_S="0.05",
        FORGE_CLAIM_MIN_IDLE_S="2",
    )
    argv = [sys.executable, "-m", "forge.cli.main", "worker", "--http-port", "0"]
    argv += ["--stream", "training-requests"]
    argv += ["--consumers", "tests.support.tune_consumers:register_killed_in_a_trial"]
    proc = subprocess.run(argv, env=env, capture_output=True, timeout=180, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert ctx.redis.xlen(ctx.keys.trials) == 4  # the study's trials went out first

    with running(worker(ctx)):
        wait_for(lambda: any(c.source_id == "k1" for c in completions(ctx)), 300)
    (done,) = [c for c in completions(ctx) if c.source_id == "k1"]
    assert done.status == "succeeded", done.error
    assert done.deliveries == 2  # reclaimed from the dead worker
    counts = done.result["tune"]["trials"]
    assert counts["completed"] + counts["pruned"] + counts["failed"] == 4
    assert counts["retried"] == 1
    assert len(versions.all(model)) == 1
    assert len(read(ctx, ctx.keys.model_versions, ModelVersion)) == 1
    client = versions.client
    experiment = client.get_experiment_by_name(f"forge/{model}").experiment_id
    killed = client.search_runs([experiment], "tags.`forge.trial_state` = 'stale'")
    assert len(killed) == 1
    assert killed[0].info.status == "KILLED"


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, the trial is left RUNNING."""


def test_a_redelivered_request_resumes_its_study_and_reruns_a_dead_workers_trial_once(
    settings: Settings,
    model: str,
    storage: optuna.storages.RDBStorage,
    digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = TrainingService.from_settings(settings)
    tuner = TuneService(settings, service, storage)
    vectors, labels = digits
    data = Dataset(
        ids=[str(i) for i in range(len(vectors))],
        vectors=vectors,
        metadata=[{"digit": int(label)} for label in labels],
    )
    request = TrainingRequest(
        id="r1", model=model, task="classifier", collection="c", params=FAST,
        tune=Tune(trials=4, space=SPACE),
    )  # fmt: skip
    fanned: list[str] = []
    started = []
    train = trial_module._train

    def dies_in_the_third_trial(*args: Any) -> Any:
        started.append(args[2].number)
        if len(started) == 3:
            raise _Killed
        return train(*args)

    monkeypatch.setattr(trial_module, "_train", dies_in_the_third_trial)
    with pytest.raises(_Killed):
        tuner.search(request, data, lambda study: fanned.append(study.name))
    monkeypatch.undo()
    # The dead worker's trial is still RUNNING: its heartbeats stopped long ago.
    with storage.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE trial_heartbeats SET heartbeat = heartbeat - interval '1 day'"
                " WHERE trial_id IN (SELECT t.trial_id FROM trials t JOIN studies s"
                " ON s.study_id = t.study_id WHERE s.study_name = :name)"
            ),
            {"name": study_name(request)},
        )

    done = tuner.search(request, data, lambda study: fanned.append(study.name))
    summary = tuner.summary(request)
    counts = summary["trials"]
    assert counts["completed"] + counts["pruned"] + counts["failed"] == 4
    assert counts["retried"] == 1
    assert studies_of(storage, model) == [study_name(request)]
    assert fanned == [study_name(request)]  # the trials went on the stream once
    study = optuna.load_study(study_name=study_name(request), storage=storage)
    (rerun,) = [t for t in study.trials if "failed_trial" in t.system_attrs]
    stale = study.trials[rerun.system_attrs["failed_trial"]]
    assert stale.number == started[2]
    assert rerun.params == stale.params  # the same trial, run again
    assert service.client.get_run(stale.user_attrs["forge.run_id"]).info.status == "KILLED"

    again = tuner.search(request, data, lambda study: fanned.append(study.name))
    assert again.version.version == done.version.version == 1
    assert len(service.versions.all(model)) == 1
    assert len(optuna.load_study(study_name=study_name(request), storage=storage).trials) == 5


def test_one_worker_draws_the_same_parameters_for_the_same_seed(
    settings: Settings,
    storage: optuna.storages.RDBStorage,
    digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
) -> None:
    service = TrainingService.from_settings(settings)
    tuner = TuneService(settings, service, storage)
    vectors, labels = digits
    data = Dataset(
        ids=[str(i) for i in range(400)],
        vectors=vectors[:400],
        metadata=[{"digit": int(label)} for label in labels[:400]],
    )
    drawn = []
    for attempt in ("a", "b"):
        model = f"m_{uuid.uuid4().hex[:10]}"
        request = TrainingRequest(
            id=attempt, model=model, task="classifier", collection="c",
            params={**FAST, "epochs": 1}, tune=Tune(trials=3, space=SPACE),
        )  # fmt: skip
        tuner.search(request, data, lambda study: None)
        study = optuna.load_study(study_name=study_name(request), storage=storage)
        drawn.append([t.params for t in study.trials])
    assert drawn[0] == drawn[1]
    assert len({json.dumps(p, sort_keys=True) for p in drawn[0]}) == 3


def test_a_search_with_export_registers_the_best_trials_exports(
    ctx: Context, collection: str, model: str, versions: ModelVersions
) -> None:
    from forge.training import artifacts, export_format, exports

    event = {**tune_request("x1", model, collection, trials=2), "export": ["onnx"]}
    refused = {
        **tune_request("x2", model, collection),
        "task": "clustering",
        "params": {},
        "tune": {"trials": 2},
        "export": ["onnx"],
    }
    publish(ctx.redis, ctx.keys.training_requests, event)
    publish(ctx.redis, ctx.keys.training_requests, refused)
    with running(worker(ctx)):
        wait_for(lambda: {c.source_id for c in completions(ctx)} >= {"x1", "x2"}, 300)
    done = {c.source_id: c for c in completions(ctx) if c.source_id in {"x1", "x2"}}
    assert done["x2"].status == "failed"
    assert done["x2"].error is not None
    assert "classifier" in done["x2"].error.message
    assert done["x1"].status == "succeeded", done["x1"].error
    (version,) = versions.all(model)
    assert version.tags["forge.trial"] == str(done["x1"].result["tune"]["best_trial"])
    assert version.tags[exports.TAG_EXPORTS] == "onnx"
    metrics = versions.metrics(version)
    assert float(version.tags[exports.TAG_INT8_DELTA]) == metrics["onnx_int8_accuracy_delta"]
    service = TrainingService.from_settings(ctx.settings)
    files = artifacts.model_files(service._download(version))
    manifest = export_format.read_manifest(files)
    assert manifest is not None
    assert manifest.int8.accuracy_delta == metrics["onnx_int8_accuracy_delta"]
