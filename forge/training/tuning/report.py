"""What ``forge tune show`` prints: a model's latest study, its trials, the best one
and how much each parameter mattered (Optuna's fANOVA importances)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from forge.errors import PermanentError
from forge.training.tuning.study import (
    ATTR_METRIC,
    ATTR_PARENT_RUN,
    ATTR_REQUEST,
    ATTR_STOPPED,
    ATTR_TRIALS,
)

if TYPE_CHECKING:
    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import FrozenTrial

# Importances compare completed trials: fewer than this say nothing.
_MIN_TRIALS_FOR_IMPORTANCE = 2


def latest_study(storage: RDBStorage, model: str) -> optuna.Study:
    """The model's most recently started study; ``PermanentError`` when it has none."""
    import optuna

    prefix = f"forge/{model}/"
    summaries = [
        s for s in optuna.get_all_study_summaries(storage, False) if s.study_name.startswith(prefix)
    ]
    if not summaries:
        raise PermanentError(f"model {model!r} has no hyperparameter search")
    latest = max(summaries, key=lambda s: (s.datetime_start is not None, s.datetime_start or 0))
    return optuna.load_study(study_name=latest.study_name, storage=storage)


def study_report(study: optuna.Study) -> dict[str, Any]:
    """The study as plain data (``forge tune show --json``)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=_rank(study)) if complete else None
    attrs = study.user_attrs
    return {
        "study": study.study_name,
        "request_id": attrs.get(ATTR_REQUEST),
        "metric": attrs.get(ATTR_METRIC),
        "direction": study.direction.name.lower(),
        "planned_trials": attrs.get(ATTR_TRIALS),
        "stopped": ATTR_STOPPED in attrs,
        "parent_run_id": attrs.get(ATTR_PARENT_RUN),
        "best_trial": None if best is None else best.number,
        "best_value": None if best is None else best.value,
        "best_params": {} if best is None else dict(best.params),
        "importances": importances(study, len(complete)),
        "trials": [_trial_row(t) for t in trials],
    }


def importances(study: optuna.Study, completed: int) -> dict[str, float]:
    """Each parameter's share of the metric's variance over completed trials; empty
    while too few trials completed to tell."""
    import optuna

    if completed < _MIN_TRIALS_FOR_IMPORTANCE:
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {name: round(float(value), 4) for name, value in found.items()}


def _rank(study: optuna.Study) -> Any:
    from optuna.study import StudyDirection

    sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
    return lambda t: sign * float(t.value)


def _trial_row(trial: FrozenTrial) -> dict[str, Any]:
    duration = trial.duration
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "value": trial.value,
        "params": dict(trial.params),
        "duration_s": None if duration is None else round(duration.total_seconds(), 3),
        "rerun_of": trial.system_attrs.get("failed_trial"),
    }
