"""A request's hyperparameter search, from its ``tune`` block to one registered version.

The worker that takes the request runs the study: it opens (or resumes) it, starts
the study's MLflow parent run, puts the trials on the trials stream once so every
trainer worker can join in, runs trials itself until none is left to start, waits
for those running elsewhere, then registers the best trial's model (already logged
by its child run) as the request's version. Other workers run one trial per entry
of the trials stream (``run_one``).

A redelivered or republished request finds its version (answered from the registry,
as any training request) or its study, and carries on with that study.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from forge.errors import PermanentError
from forge.events import TrainingRequest, TuneTrial
from forge.settings import Settings
from forge.training.base import Dataset
from forge.training.service import Registered, TrainingService, request_tags
from forge.training.tasks import get_trainer
from forge.training.tracking import TrainingRun
from forge.training.tuning.space import SearchPlan, plan_search
from forge.training.tuning.study import (
    ATTR_FANNED_OUT,
    ATTR_PARENT_RUN,
    TRIAL_MODEL_ID,
    TRIAL_MODEL_URI,
    TRIAL_RUN,
    Study,
    study_name,
)
from forge.training.tuning.trial import (
    TAG_STUDY,
    TAG_TRIAL,
    TRIAL_PRIMARY_METRIC,
    TrialJob,
    TrialResult,
    run_trial,
)
from forge.training.versions import TAG_PRIMARY_METRIC

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

log = structlog.get_logger(__name__)

FanOut = Callable[[Study], None]
# On the study's MLflow run when ``forge tune stop`` cut it short.
TAG_STOPPED = "forge.study_stopped"


class TuneService:
    """Hyperparameter searches over ``training``'s trainers, MLflow and registry, with
    studies in ``storage``."""

    def __init__(
        self,
        settings: Settings,
        training: TrainingService,
        storage: RDBStorage,
        wait: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.training = training
        self.storage = storage
        self._wait = wait

    def plan(self, request: TrainingRequest) -> SearchPlan:
        """The request's search, checked before any data is loaded."""
        if request.tune is None:
            raise PermanentError("the request has no `tune` block")
        if request.warm_start_from is not None:
            raise PermanentError(
                "a search trains every trial from scratch: leave out `warm_start_from`"
            )
        from forge.training import exports

        exports.check_exportable(request.task, list(request.export))
        ranks = request.resources and (request.resources.processes or request.resources.gpus)
        if ranks and ranks > 1:
            raise PermanentError(
                "a search trains each trial in one process (its trials spread over the"
                " workers): leave out `resources`"
            )
        return plan_search(get_trainer(request.task), request.params, request.tune)

    def search(
        self,
        request: TrainingRequest,
        data: Dataset,
        fan_out: FanOut,
        *,
        stream: str = "",
        embedding_model: str | None = None,
    ) -> Registered:
        """Run (or resume) the request's study to its end; register its best trial."""
        plan = self.plan(request)
        study, created = Study.open(self.storage, request, plan)
        log.info("study opened", study=study.name, created=created, trials=plan.trials)
        parent = self._parent_run(study, request, stream, embedding_model)
        if not study.attrs.get(ATTR_FANNED_OUT):
            fan_out(study)
            study.set_attrs({ATTR_FANNED_OUT: True})
        job = TrialJob(request, data, get_trainer(request.task), parent, stream, embedding_model)
        while True:
            trial = study.admit()
            if trial is not None:
                run_trial(self.training, study, trial, job)
            elif study.finished():
                break
            else:  # the last trials run on other workers
                self._wait(self.settings.tune_poll_s)
        return self._register(study, request, parent, stream, embedding_model)

    def run_one(
        self, event: TuneTrial, load: Callable[[], tuple[Dataset, str | None]], stream: str = ""
    ) -> TrialResult | str:
        """Run the study's next trial for an entry of the trials stream, on the rows
        ``load`` gives (and the embedding model that made them); a string says why
        there was none to run (then nothing is loaded)."""
        request = event.request
        if self.training.versions.find_by_request(request.model, request.id) is not None:
            return "the study is over: its version is registered"
        plan = self.plan(request)
        try:
            study = Study(self.storage, event.study, plan, int(request.params.get("seed", 0)))
        except KeyError:  # what optuna.load_study raises
            return f"no study named {event.study!r}"
        trial = study.admit()
        if trial is None:
            return "the study was stopped" if study.stopped else "the study has all its trials"
        data, embedding_model = load()
        job = TrialJob(
            request,
            data,
            get_trainer(request.task),
            str(study.attrs.get(ATTR_PARENT_RUN, "")),
            stream,
            embedding_model,
        )
        return run_trial(self.training, study, trial, job)

    def summary(self, request: TrainingRequest) -> dict[str, Any]:
        """What the request's completion says of its study."""
        try:
            study = Study(self.storage, study_name(request), self.plan(request), 0)
        except KeyError:  # no such study (what optuna.load_study raises)
            return {}
        return summarize(study)

    # ------------------------------------------------------------------ helpers

    def _parent_run(
        self,
        study: Study,
        request: TrainingRequest,
        stream: str,
        embedding_model: str | None,
    ) -> str:
        """The study's MLflow run, made by the first delivery: each trial's run is its
        child."""
        known = study.attrs.get(ATTR_PARENT_RUN)
        if known:
            return str(known)
        tags = {**request_tags(request, stream, embedding_model), TAG_STUDY: study.name}
        plan = study.plan
        params = {
            "tune.trials": plan.trials,
            "tune.metric": plan.metric,
            "tune.direction": plan.direction,
            "tune.timeout_s": plan.timeout_s,
            "tune.space": msgspec.to_builtins(plan.space),
            **request.params,
        }
        run = TrainingRun.start(self.training.client, request.model, tags, params)
        study.set_attrs({ATTR_PARENT_RUN: run.run_id})
        return run.run_id

    def _register(
        self,
        study: Study,
        request: TrainingRequest,
        parent: str,
        stream: str,
        embedding_model: str | None,
    ) -> Registered:
        best = study.best()
        counts = study.counts()
        if best is None:
            self._end_parent(parent, study, "FAILED")
            what = f"no trial of study {study.name!r} completed"
            if study.stopped:
                what = f"study {study.name!r} was stopped before any trial completed"
            raise PermanentError(f"{what} ({counts.pruned} pruned, {counts.failed} failed)")
        attrs = best.user_attrs
        tags = {
            **request_tags(request, stream, embedding_model),
            TAG_PRIMARY_METRIC: str(attrs[TRIAL_PRIMARY_METRIC]),
            TAG_STUDY: study.name,
            TAG_TRIAL: str(best.number),
        }
        if request.export:
            from forge.training import exports

            trial_tags = self.training.client.get_run(str(attrs[TRIAL_RUN])).data.tags
            tags.update(exports.tags_of(trial_tags))
        registered = self.training.register_model(
            request,
            str(attrs[TRIAL_MODEL_URI]),
            str(attrs[TRIAL_RUN]),
            attrs.get(TRIAL_MODEL_ID),
            tags,
            params={**request.params, **best.params},
        )
        self._end_parent(parent, study, "FINISHED")
        return registered

    def _end_parent(self, run_id: str, study: Study, status: str) -> None:
        """Log the study's outcome on its run, once."""
        from mlflow.entities import Metric, Param, RunTag

        client = self.training.client
        if client.get_run(run_id).info.status != "RUNNING":
            return
        counts = study.counts()
        now_ms = int(time.time() * 1000)
        values: dict[str, float] = {
            "trials_completed": counts.completed,
            "trials_pruned": counts.pruned,
            "trials_failed": counts.failed,
            "trials_retried": counts.retried,
        }
        best = study.best()
        params: list[Param] = []
        if best is not None and best.value is not None:
            values[f"best_{study.plan.metric}"] = best.value
            params = [Param(f"best.{k}", str(v)) for k, v in sorted(best.params.items())]
        metrics = [Metric(k, float(v), now_ms, 0) for k, v in values.items()]
        tags = [RunTag(TAG_STOPPED, "true")] if study.stopped else []
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        client.set_terminated(run_id, status)


def summarize(study: Study) -> dict[str, Any]:
    counts = study.counts()
    best = study.best()
    return {
        "study": study.name,
        "metric": study.plan.metric,
        "direction": study.plan.direction,
        "stopped": study.stopped,
        "planned_trials": study.target,
        "best_trial": None if best is None else best.number,
        "best_value": None if best is None else best.value,
        "best_params": {} if best is None else dict(best.params),
        "trials": {
            "completed": counts.completed,
            "pruned": counts.pruned,
            "failed": counts.failed,
            "retried": counts.retried,
        },
        "parent_run_id": study.attrs.get(ATTR_PARENT_RUN),
    }
