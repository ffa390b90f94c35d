"""One trial of a study: parameters drawn, the task trained with them as an MLflow
child run of the study's run, the per-epoch validation metric fed to the pruner, and
the outcome told to the study.

A trial that fails for its own reasons (parameters the trainer refuses, a diverged
loss, its timeout) is a failed trial. A trial cut short by the infrastructure (the
database or MLflow went away) is failed and queued again with the same parameters, as
a stale trial is, and the error goes on to fail the delivery, which Forge retries.

A trial of a stopped study is pruned at its next epoch once any trial of the study
completed (see ``Study.cuts_running_trials``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog

from forge.errors import PermanentError
from forge.events import TrainingRequest
from forge.training.base import Dataset, EpochReport, Trainer
from forge.training.service import TrainingService, request_tags, with_exports
from forge.training.tasks import parse_params
from forge.training.tracking import TrainingRun
from forge.training.tuning.space import suggest
from forge.training.tuning.study import (
    TRIAL_MODEL_ID,
    TRIAL_MODEL_URI,
    TRIAL_RUN,
    Study,
)
from forge.training.versions import TAG_PRIMARY_METRIC

if TYPE_CHECKING:
    import optuna

log = structlog.get_logger(__name__)

TrialState = Literal["complete", "pruned", "failed"]
TAG_STUDY = "forge.study"
TAG_TRIAL = "forge.trial"
TAG_TRIAL_STATE = "forge.trial_state"
TAG_PARENT_RUN = "mlflow.parentRunId"
TRIAL_PRIMARY_METRIC = "forge.primary_metric"


@dataclass(frozen=True, slots=True)
class TrialJob:
    """What every trial of a request trains on, and where it reports."""

    request: TrainingRequest
    data: Dataset
    trainer: Trainer
    parent_run_id: str
    stream: str = ""
    embedding_model: str | None = None


@dataclass(frozen=True, slots=True)
class TrialResult:
    number: int
    state: TrialState
    params: dict[str, Any]
    value: float | None = None
    error: str = ""
    run_id: str = ""

    def as_result(self, study: str) -> dict[str, Any]:
        result = {"study": study, "trial": self.number, "state": self.state}
        result.update(params=self.params, value=self.value, run_id=self.run_id)
        if self.error:
            result["error"] = self.error
        return result


def run_trial(
    service: TrainingService, study: Study, trial: optuna.Trial, job: TrialJob
) -> TrialResult:
    """Train one admitted trial and tell the study how it ended."""
    with _Heartbeat(study, trial):
        drawn = suggest(trial, job.trainer, study.plan.space)
        params = {**job.request.params, **drawn}
        _kill_stale_run(service, trial)
        tags = {
            **request_tags(job.request, job.stream, job.embedding_model),
            TAG_PARENT_RUN: job.parent_run_id,
            TAG_STUDY: study.name,
            TAG_TRIAL: str(trial.number),
        }
        run_params = {**params, "rows": len(job.data)}
        run = TrainingRun.start(service.client, job.request.model, tags, run_params)
        trial.set_user_attr(TRIAL_RUN, run.run_id)
        return _train(service, study, trial, job, run, params, drawn, tags)


def _train(
    service: TrainingService,
    study: Study,
    trial: optuna.Trial,
    job: TrialJob,
    run: TrainingRun,
    params: dict[str, Any],
    drawn: dict[str, Any],
    tags: dict[str, str],
) -> TrialResult:
    import optuna
    from optuna.trial import TrialState as OptunaState

    n, plan = trial.number, study.plan
    try:
        parsed = parse_params(job.trainer, params)
        # GPU admission as for any training: the trial waits (heartbeating) for room.
        need_bytes = job.trainer.gpu_memory_bytes(job.data, parsed)
        with service.admission.place(job.request.model, need_bytes) as device:
            model = service.train_model(
                job.request,
                job.data,
                job.trainer,
                parsed,
                None,
                run.log_epoch,
                device,
                trial=n,
                after_epoch=_pruner(study, trial, plan.prunes_on_epoch_metric),
            )
        value = float(model.metrics[plan.metric])
        # Every trial exports: any one of them may turn out the best, and the version
        # is the best trial's logged model as it stands.
        model, export_tags = with_exports(job.request, job.data, parsed, model)
        tags.update({TAG_PRIMARY_METRIC: model.primary_metric, **export_tags})
        finals = {
            TAG_PRIMARY_METRIC: model.primary_metric,
            TAG_TRIAL_STATE: "complete",
            **export_tags,
        }
        run.finish(model, finals, model_tags=tags, embedding_model=job.embedding_model)
        trial.set_user_attr(TRIAL_MODEL_URI, run.model_uri)
        trial.set_user_attr(TRIAL_MODEL_ID, run.model_id)
        trial.set_user_attr(TRIAL_PRIMARY_METRIC, model.primary_metric)
        study.optuna.tell(trial, value)
        log.info("trial complete", study=study.name, trial=n, value=value, params=drawn)
        return TrialResult(n, "complete", drawn, value, run_id=run.run_id)
    except optuna.TrialPruned as exc:
        run.stop("KILLED", {TAG_TRIAL_STATE: "pruned"})
        study.optuna.tell(trial, state=OptunaState.PRUNED)
        log.info("trial pruned", study=study.name, trial=n, reason=str(exc))
        return TrialResult(n, "pruned", drawn, run_id=run.run_id)
    except PermanentError as exc:
        run.fail(exc)
        service.client.set_tag(run.run_id, TAG_TRIAL_STATE, "failed")
        study.optuna.tell(trial, state=OptunaState.FAIL)
        log.warning("trial failed", study=study.name, trial=n, error=str(exc))
        error = f"{type(exc).__name__}: {exc}"
        return TrialResult(n, "failed", drawn, error=error, run_id=run.run_id)
    except Exception as exc:
        run.fail(exc)
        _requeue(study, trial)
        raise


def _pruner(study: Study, trial: optuna.Trial, enabled: bool) -> Any:
    import optuna

    def check(report: EpochReport) -> None:
        if study.cuts_running_trials():
            raise optuna.TrialPruned(f"the study was stopped (after epoch {report.epoch})")
        if not enabled or report.metric is None:
            return
        trial.report(report.metric, report.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {report.epoch}")

    return check


def _requeue(study: Study, trial: optuna.Trial) -> None:
    """Fail the trial and queue it again, as the storage does a stale one; when the
    storage itself is out of reach the trial goes stale and is queued then."""
    from optuna.trial import TrialState as OptunaState

    try:
        frozen = study.optuna.tell(trial, state=OptunaState.FAIL)
        callback = study.storage.get_heartbeat_stale_trial_callback()
        if callback is not None:
            callback(study.optuna, frozen)
    except Exception as exc:
        log.warning("trial left to go stale", study=study.name, trial=trial.number, error=str(exc))


def _kill_stale_run(service: TrainingService, trial: optuna.Trial) -> None:
    """A rerun of a stale trial inherits its run id: that run's worker died, so
    nothing will finish it."""
    stale = trial.user_attrs.get(TRIAL_RUN)
    if not stale:
        return
    if service.client.get_run(stale).info.status == "RUNNING":
        service.client.set_tag(stale, TAG_TRIAL_STATE, "stale")
        service.client.set_terminated(stale, "KILLED")


class _Heartbeat:
    """Tells the study the trial is alive, from a thread, so that a trial blocked in a
    long training step is not taken for dead."""

    def __init__(self, study: Study, trial: optuna.Trial) -> None:
        self._storage = study.storage
        # Optuna's Trial has no public id; the storage keys heartbeats by it.
        self._trial_id = trial._trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="trial-heartbeat", daemon=True)

    def __enter__(self) -> None:
        self._storage.record_heartbeat(self._trial_id)
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        interval_s = self._storage.get_heartbeat_interval() or 1
        while not self._stop.wait(interval_s):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception as exc:
                log.warning("trial heartbeat not recorded", error=str(exc))
