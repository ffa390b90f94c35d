"""``forge tune stop``: mark a running study stopped in the study storage.

Workers read the mark where they already read the study's deadline: no trial starts
after it (a ``tune-trial`` entry taken later is settled as skipped), running trials
are pruned at their next epoch once one trial completed, and the worker running the
search registers the best trial so far. A study with nothing left to run is left
unmarked, so its completion does not claim a stop that cut nothing short.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forge.errors import PermanentError
from forge.training.tuning.study import ATTR_STOPPED, ATTR_TRIALS, admits_trials, name_of

if TYPE_CHECKING:
    from optuna.storages import RDBStorage


@dataclass(frozen=True, slots=True)
class StopOutcome:
    study: str
    # "stopped" now, "already stopped" earlier, or "finished": nothing left to stop.
    state: str
    running: int


def stop_study(storage: RDBStorage, model: str, request_id: str) -> StopOutcome:
    """Stop the study of ``model``'s request ``request_id``; ``PermanentError`` when
    there is no such study."""
    import optuna
    from optuna.trial import TrialState

    name = name_of(model, request_id)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # what optuna.load_study raises for an unknown name
        raise PermanentError(f"model {model!r} has no study for request {request_id!r}") from None
    attrs = study.user_attrs
    trials = study.get_trials(deepcopy=False)
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    if ATTR_STOPPED in attrs:
        return StopOutcome(name, "already stopped", running)
    # Without its trial count the study was made by a delivery that died at once: the
    # request's next delivery resumes it, so it can still be stopped.
    planned = ATTR_TRIALS in attrs
    if planned and not running and not admits_trials(attrs, trials, int(attrs[ATTR_TRIALS])):
        return StopOutcome(name, "finished", running)
    # No lock: a trial admitted just before this still starts, and is pruned like
    # any other running one.
    study.set_user_attr(ATTR_STOPPED, time.time())
    return StopOutcome(name, "stopped", running)
