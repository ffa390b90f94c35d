"""``forge tune stop``: a stopped study starts no more trials, prunes running ones once
a trial completed, settles its trial entries as skipped and registers the best trial
so far. Real Redis, PostgreSQL, MLflow (SQLite) and Optuna; the stop is taken from
inside a trial's epoch hook, so where it lands is fixed, not raced."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import optuna
import pytest

from forge.errors import PermanentError
from forge.events import TrainingRequest, Tune, TuneTrial
from forge.runtime.context import Context
from forge.settings import Settings
from forge.training.base import Dataset, EpochReport
from forge.training.service import TrainingService
from forge.training.tuning import trial as trial_module
from forge.training.tuning.search import TAG_STOPPED, TuneService
from forge.training.tuning.stop import stop_study
from forge.training.tuning.storage import open_storage
from forge.training.tuning.study import Study, study_name
from forge.training.versions import ModelVersions
from forge.vectorstore import Row, VectorStore
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.events import publish
from tests.support.redis_helpers import running, wait_for
from tests.support.workers import dead_letters
from tests.test_tuning import FAST, SPACE, completions, tune_request, worker

Hook = Callable[[Study, optuna.Trial, EpochReport], None]


@pytest.fixture
def settings(settings: Settings, mlflow_uri: str, pg_url: str) -> Settings:
    return settings.replace(mlflow_tracking_uri=mlflow_uri, postgres_url=pg_url, tune_poll_s=0.05)


@pytest.fixture
def storage(settings: Settings, pg_url: str) -> Iterator[optuna.storages.RDBStorage]:
    opened = open_storage(pg_url, settings)
    yield opened
    opened.remove_session()
    opened.engine.dispose()


@pytest.fixture
def collection(vector_store: VectorStore, collection_name: str, digits: Dataset) -> str:
    rows = [
        Row(i, v, "load", metadata=m)
        for i, v, m in zip(digits.ids, digits.vectors, digits.metadata, strict=True)
    ]
    vector_store.write_batch(collection_name, rows, ["load"], f"test:{uuid.uuid4().hex}")
    return collection_name


@pytest.fixture
def tune_cli(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setenv("POSTGRES_URL", str(settings.postgres_url))
    monkeypatch.setenv("FORGE_HOME", str(settings.home_dir))


def before_each_epoch(monkeypatch: pytest.MonkeyPatch, hook: Hook) -> None:
    """Run ``hook`` at every epoch report of every trial, before the pruner looks."""
    pruner = trial_module._pruner

    def hooked(study: Study, trial: optuna.Trial, enabled: bool) -> Any:
        check = pruner(study, trial, enabled)

        def checked(report: EpochReport) -> None:
            hook(study, trial, report)
            check(report)

        return checked

    monkeypatch.setattr(trial_module, "_pruner", hooked)


def tune(request_id: str, model: str, trials: int, **params: Any) -> TrainingRequest:
    return TrainingRequest(
        id=request_id, model=model, task="classifier", collection="c",
        params={**FAST, **params}, tune=Tune(trials=trials, space=SPACE),
    )  # fmt: skip


def test_a_stopped_study_registers_the_best_trial_so_far_and_skips_its_other_trials(
    ctx: Context,
    collection: str,
    model: str,
    versions: ModelVersions,
    storage: optuna.storages.RDBStorage,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tune_cli: None,
) -> None:
    planned = 8
    stops: list[str] = []

    def stop_once_a_trial_completed(study: Study, trial: optuna.Trial, _: EpochReport) -> None:
        if not stops and study.best() is not None:
            stops.append(stop_study(storage, model, "s1").state)

    before_each_epoch(monkeypatch, stop_once_a_trial_completed)
    publish(ctx.redis, ctx.keys.training_requests, tune_request("s1", model, collection, trials=8))

    def trial_entries() -> list[Any]:
        return [c for c in completions(ctx) if c.source_stream == ctx.keys.trials]

    with running(worker(ctx)):
        wait_for(lambda: any(c.source_id == "s1" for c in completions(ctx)), 300)
        wait_for(lambda: len(trial_entries()) == planned, 120)
    assert stops == ["stopped"]
    (done,) = [c for c in completions(ctx) if c.source_id == "s1"]
    assert done.status == "succeeded", done.error
    summary = done.result["tune"]
    assert summary["stopped"] is True
    assert summary["planned_trials"] == planned
    counts = summary["trials"]
    assert counts["completed"] >= 1
    assert counts["pruned"] >= 1  # the trial that reported the first epoch after the stop
    ran = counts["completed"] + counts["pruned"] + counts["failed"]
    assert ran < planned
    study = optuna.load_study(study_name=summary["study"], storage=storage)
    assert len(study.trials) == ran  # none started after the stop

    # One version: the best trial so far; the study's run says it was stopped.
    (version,) = versions.all(model)
    assert version.version == done.result["model_version"]
    assert version.tags["forge.trial"] == str(summary["best_trial"])
    assert versions.client.get_run(summary["parent_run_id"]).data.tags[TAG_STOPPED] == "true"

    # Every trial entry settled as done, never dead-lettered; those after the stop
    # skipped.
    entries = trial_entries()
    assert {c.status for c in entries} == {"succeeded"}
    skipped = [c.result["skipped"] for c in entries if "skipped" in c.result]
    assert len(skipped) >= planned - ran
    assert set(skipped) <= {
        "the study was stopped",
        "the study is over: its version is registered",
    }
    assert dead_letters(ctx) == []

    # Stopping again is harmless; `forge tune show` says the study was stopped.
    code, out, _ = run_cli(capsys, "tune", "stop", model, "s1")
    assert code == 0
    assert "already stopped" in out
    code, out, _ = run_cli(capsys, "tune", "show", model)
    assert code == 0
    assert "(stopped)" in out


def test_a_study_stopped_before_any_trial_completed_fails_with_the_reason(
    settings: Settings,
    model: str,
    storage: optuna.storages.RDBStorage,
    digits: Dataset,
    capsys: pytest.CaptureFixture[str],
    tune_cli: None,
) -> None:
    tuner = TuneService(settings, TrainingService.from_settings(settings), storage)
    request = tune("s2", model, trials=4)
    code, _, err = run_cli(capsys, "tune", "stop", model, "s2")
    assert_one_line_error(code, err, "no study for request 's2'")
    code, _, err = run_cli(capsys, "tune", "stop", "bad name!", "s2")
    assert_one_line_error(code, err)

    said: list[tuple[int, str, str]] = []

    def stop_instead_of_fanning_out(study: Study) -> None:
        said.append(run_cli(capsys, "tune", "stop", model, "s2"))
        said.append(run_cli(capsys, "tune", "stop", model, "s2"))

    with pytest.raises(PermanentError, match="was stopped before any trial completed"):
        tuner.search(request, digits, stop_instead_of_fanning_out)
    (first, second) = said
    assert first[0] == second[0] == 0
    assert "stopped study" in first[1]
    assert "already stopped" in second[1]
    assert optuna.load_study(study_name=study_name(request), storage=storage).trials == []

    # A trial entry of the stopped study is skipped before any row is read.
    def load() -> tuple[Dataset, str | None]:
        raise AssertionError("a skipped trial loads nothing")

    entry = TuneTrial(id="s2:trial-0", study=study_name(request), request=request)
    assert tuner.run_one(entry, load) == "the study was stopped"
    summary = tuner.summary(request)
    assert summary["stopped"] is True
    assert summary["trials"]["completed"] == 0


def test_a_trial_running_when_the_study_stops_finishes_while_none_completed(
    settings: Settings,
    model: str,
    storage: optuna.storages.RDBStorage,
    digits: Dataset,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tune_cli: None,
) -> None:
    tuner = TuneService(settings, TrainingService.from_settings(settings), storage)
    rows = slice(0, 400)
    data = Dataset(digits.ids[rows], digits.vectors[rows], digits.metadata[rows])

    def stop_at_the_first_epoch(study: Study, trial: optuna.Trial, report: EpochReport) -> None:
        if study.name == study_name(stopped) and trial.number == 0 and report.epoch == 1:
            stop_study(storage, model, "s3")

    stopped = tune("s3", model, trials=4)
    before_each_epoch(monkeypatch, stop_at_the_first_epoch)
    done = tuner.search(stopped, data, lambda study: None)
    summary = tuner.summary(stopped)
    assert summary["stopped"] is True
    assert summary["trials"] == {"completed": 1, "pruned": 0, "failed": 0, "retried": 0}
    assert done.version.tags["forge.trial"] == "0"

    # A study with no trial left to run is not marked: its completion claims no stop.
    finished = tune("s4", model, trials=1, epochs=1)
    tuner.search(finished, data, lambda study: None)
    code, out, _ = run_cli(capsys, "tune", "stop", model, "s4")
    assert code == 0
    assert "nothing to stop" in out
    assert tuner.summary(finished)["stopped"] is False
