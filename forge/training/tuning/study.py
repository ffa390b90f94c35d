"""One request's study: made once, found again by every later delivery, and handing
out its trials so that the workers sharing it run exactly ``trials`` of them.

The study is named after the model and the request id, so a redelivered or
republished request resumes it. Its user attributes keep what every worker must
agree on: the metric, the deadline (absolute, so a resumed study does not get more
time), the MLflow parent run, whether the trials stream got its entries.

``admit`` hands out the next trial under a PostgreSQL advisory lock on the study:
first it fails stale trials (their worker died; the storage's callback queues each
again, with the same parameters, as a WAITING trial), then it takes a waiting trial,
else a new one while the study has fewer than ``trials`` (a queued retry does not
count: it is the same trial run again), else none. A stopped study, or one past its
deadline, admits none.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from forge.events import TrainingRequest
from forge.training.tuning.space import SearchPlan
from forge.training.tuning.storage import STUDY_LOCK_CLASS

if TYPE_CHECKING:
    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import FrozenTrial

ATTR_MODEL = "forge.model"
ATTR_REQUEST = "forge.request_id"
ATTR_METRIC = "forge.metric"
ATTR_TRIALS = "forge.trials"
ATTR_DEADLINE = "forge.deadline_unix_s"
ATTR_PARENT_RUN = "forge.parent_run_id"
ATTR_FANNED_OUT = "forge.fanned_out"
ATTR_SEED = "forge.seed"
# When ``forge tune stop`` stopped the study (unix seconds); absent while it runs on.
ATTR_STOPPED = "forge.stopped_unix_s"
# Trial user attributes: the MLflow run and the model it logged.
TRIAL_RUN = "forge.run_id"
TRIAL_MODEL_URI = "forge.model_uri"
TRIAL_MODEL_ID = "forge.model_id"
_STARTUP_TRIALS = 10


def study_name(request: TrainingRequest) -> str:
    return name_of(request.model, request.id)


def name_of(model: str, request_id: str) -> str:
    return f"forge/{model}/{request_id}"


def admits_trials(attrs: dict[str, Any], trials: list[FrozenTrial], target: int) -> bool:
    """Whether a trial may still start: the study is neither stopped nor past its
    deadline, and a rerun waits or fewer than ``target`` trials were drawn (a queued
    rerun does not count: it is the same trial run again)."""
    from optuna.trial import TrialState

    deadline = attrs.get(ATTR_DEADLINE)
    if ATTR_STOPPED in attrs or (deadline is not None and time.time() >= float(deadline)):
        return False
    waiting = any(t.state == TrialState.WAITING for t in trials)
    originals = sum(1 for t in trials if "failed_trial" not in t.system_attrs)
    return waiting or originals < target


@dataclass(frozen=True, slots=True)
class Counts:
    """Trials by how they ended; a stale trial run again counts once, as its rerun."""

    completed: int = 0
    pruned: int = 0
    failed: int = 0
    retried: int = 0


class Study:
    """A request's Optuna study in the RDB storage."""

    def __init__(self, storage: RDBStorage, name: str, plan: SearchPlan, seed: int) -> None:
        self.storage = storage
        self.name = name
        self.plan = plan
        self.seed = seed
        self.optuna = self._load()

    @classmethod
    def open(
        cls, storage: RDBStorage, request: TrainingRequest, plan: SearchPlan
    ) -> tuple[Study, bool]:
        """The request's study, and whether this call created it."""
        import optuna

        name = study_name(request)
        seed = int(request.params.get("seed", 0))
        try:
            optuna.create_study(storage=storage, study_name=name, direction=plan.direction)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            created = False
        study = cls(storage, name, plan, seed)
        # Also when an earlier delivery died between creating the study and this.
        if created or ATTR_TRIALS not in study.attrs:
            study.set_attrs(
                {
                    ATTR_MODEL: request.model,
                    ATTR_REQUEST: request.id,
                    ATTR_METRIC: plan.metric,
                    ATTR_SEED: seed,
                    ATTR_DEADLINE: None if plan.timeout_s is None else time.time() + plan.timeout_s,
                    ATTR_TRIALS: plan.trials,  # last: its presence says they all are set
                }
            )
        return study, created

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.optuna.user_attrs)

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        for key, value in attrs.items():
            self.optuna.set_user_attr(key, value)

    @property
    def target(self) -> int:
        return int(self.attrs.get(ATTR_TRIALS, self.plan.trials))

    @property
    def stopped(self) -> bool:
        return ATTR_STOPPED in self.attrs

    def cuts_running_trials(self) -> bool:
        """Whether a running trial should end at its next epoch: the study was stopped
        and has a completed trial (with none, trials run on, so that the stop still
        yields a version)."""
        return self.stopped and self.best() is not None

    # ------------------------------------------------------------------ trials

    def admit(self) -> optuna.Trial | None:
        """The next trial to run, or ``None`` when the study needs none now."""
        with self._locked():
            self._fail_stale()
            trials = self.optuna.get_trials(deepcopy=False)
            if not admits_trials(self.attrs, trials, self.target):
                return None
            with warnings.catch_warnings():
                # Forge runs the heartbeat itself (see trial.py), outside Study.optimize.
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = self.optuna.ask()
        self._seed_sampler(trial.number)
        return trial

    def finished(self) -> bool:
        """No trial runs or waits, and no new one may start."""
        from optuna.trial import TrialState

        with self._locked():
            self._fail_stale()
            trials = self.optuna.get_trials(deepcopy=False)
        if any(t.state == TrialState.RUNNING for t in trials):
            return False
        return not admits_trials(self.attrs, trials, self.target)

    def counts(self) -> Counts:
        from optuna.trial import TrialState

        trials = self.optuna.get_trials(deepcopy=False)
        rerun = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
        states = [t.state for t in trials if t.number not in rerun]
        return Counts(
            completed=states.count(TrialState.COMPLETE),
            pruned=states.count(TrialState.PRUNED),
            failed=states.count(TrialState.FAIL),
            retried=len(rerun),
        )

    def best(self) -> FrozenTrial | None:
        try:
            return self.optuna.best_trial
        except ValueError:  # no trial completed
            return None

    def trial(self, number: int) -> FrozenTrial:
        return self.optuna.get_trials(deepcopy=False)[number]

    # ------------------------------------------------------------------ helpers

    def _load(self) -> optuna.Study:
        import optuna

        # Startup trials are random; a pruner needs a few finished trials to compare.
        startup = max(1, min(_STARTUP_TRIALS, self.plan.trials // 2))
        pruner = optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=1)
        return optuna.load_study(
            study_name=self.name, storage=self.storage, sampler=self._sampler(0), pruner=pruner
        )

    def _sampler(self, number: int) -> optuna.samplers.BaseSampler:
        import optuna

        startup = max(1, min(_STARTUP_TRIALS, self.plan.trials // 2))
        # constant_liar: trials running elsewhere count as bad for now, so concurrent
        # workers do not all sample the same promising corner.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=(self.seed * 100_003 + number) % 2**32,  # numpy's seed range
                n_startup_trials=startup,
                constant_liar=True,
            )

    def _seed_sampler(self, number: int) -> None:
        """Seed by trial number: workers sharing a study must not draw the same random
        start, and one study run twice draws the same parameters."""
        self.optuna.sampler = self._sampler(number)

    def _fail_stale(self) -> None:
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.optuna)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        from sqlalchemy import text

        with self.storage.engine.begin() as conn:
            conn.execute(
                text("SELECT pg_advisory_xact_lock(:c, :k)"),
                {"c": STUDY_LOCK_CLASS, "k": self.optuna._study_id},
            )
            yield
