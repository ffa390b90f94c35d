"""What a hyperparameter search searches: the space a request's ``tune.space`` gives
(checked against the task's parameters), each task's default space and metrics, and
how a trial draws its parameters from the space.

A range is ``{"low", "high", "log"}``: integers for an integer parameter, reals for a
real one; ``log`` draws on a log scale (both bounds positive). ``{"choices": [...]}``
picks one value. Every bound and choice must be a value the task accepts, so a
search never wastes a trial on parameters the trainer would refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from msgspec import inspect

from forge.errors import PermanentError
from forge.events import Tune
from forge.training.base import Trainer, coerce_params

if TYPE_CHECKING:
    import optuna

Direction = Literal["maximize", "minimize"]
Choice = str | int | float | bool


class ParamRange(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One parameter's part of the space: a range (``low``, ``high``, ``log``) or
    ``choices``, never both."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    choices: list[Choice] | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("give either `choices` or `low`/`high`, not both")
            if not self.choices:
                raise ValueError("`choices` is empty")
            if len({msgspec.json.encode(c) for c in self.choices}) != len(self.choices):
                raise ValueError("`choices` repeats a value")
            return
        if self.low is None or self.high is None:
            raise ValueError("a range needs both `low` and `high` (or give `choices`)")
        if not self.low < self.high:
            raise ValueError(f"`low` ({self.low}) must be below `high` ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs a positive `low`, got {self.low}")


Space = dict[str, ParamRange]


@dataclass(frozen=True, slots=True)
class TaskSearch:
    """A task's default space, the metrics a study of it may optimize (with the
    direction each is better in), and the one it optimizes by default."""

    space: Space
    metrics: Mapping[str, Direction]
    default_metric: str


_CLASSIFICATION_METRICS: dict[str, Direction] = {
    "val_macro_f1": "maximize",
    "val_accuracy": "maximize",
    "train_loss": "minimize",
}
SEARCHES: dict[str, TaskSearch] = {
    "classifier": TaskSearch(
        {
            "learning_rate": ParamRange(low=1e-4, high=1e-1, log=True),
            "hidden_dim": ParamRange(choices=[64, 128, 256]),
            "dropout": ParamRange(low=0.0, high=0.5),
            "weight_decay": ParamRange(low=1e-5, high=1e-1, log=True),
        },
        {**_CLASSIFICATION_METRICS, "val_loss": "minimize"},
        "val_macro_f1",
    ),
    "incremental": TaskSearch(
        {
            "alpha": ParamRange(low=1e-6, high=1e-2, log=True),
            "loss": ParamRange(choices=["log_loss", "modified_huber", "hinge"]),
        },
        _CLASSIFICATION_METRICS,
        "val_macro_f1",
    ),
    "clustering": TaskSearch(
        {"n_clusters": ParamRange(low=2, high=32)},
        {"silhouette": "maximize", "inertia": "minimize"},
        "silhouette",
    ),
}


@dataclass(frozen=True, slots=True)
class SearchPlan:
    """A request's search, checked: the space, the metric and which way is better."""

    space: Space
    metric: str
    direction: Direction
    trials: int
    timeout_s: float | None

    @property
    def prunes_on_epoch_metric(self) -> bool:
        """Whether the per-epoch validation metric (higher is better for every task)
        may feed the pruner: only when the study also maximizes."""
        return self.direction == "maximize"


def plan_search(trainer: Trainer, params: dict[str, Any], tune: Tune) -> SearchPlan:
    """The request's ``tune`` block checked against ``trainer``; ``PermanentError``
    says what is wrong (an unknown parameter or metric, a bad range or value)."""
    search = SEARCHES.get(trainer.task)
    if search is None:
        raise PermanentError(f"task {trainer.task!r} has no hyperparameter search")
    space = search.space if tune.space is None else _parse(tune.space)
    if not space:
        raise PermanentError("the search space is empty: name at least one parameter")
    _check_against_task(trainer, params, space)
    metric = tune.metric or search.default_metric
    if metric not in search.metrics:
        known = ", ".join(sorted(search.metrics))
        raise PermanentError(
            f"unknown metric {metric!r} for a {trainer.task} study (known: {known})"
        )
    direction = tune.direction or search.metrics[metric]
    return SearchPlan(space, metric, direction, tune.trials, tune.timeout_s)


def suggest(trial: optuna.Trial, trainer: Trainer, space: Space) -> dict[str, Any]:
    """The trial's parameters, drawn from ``space`` in name order."""
    kinds = _field_kinds(trainer)
    drawn: dict[str, Any] = {}
    for name in sorted(space):
        r = space[name]
        low, high = r.low or 0, r.high or 0  # both set when there are no choices
        if r.choices is not None:
            drawn[name] = trial.suggest_categorical(name, r.choices)
        elif kinds[name] == "int":
            drawn[name] = trial.suggest_int(name, int(low), int(high), log=r.log)
        else:
            drawn[name] = trial.suggest_float(name, float(low), float(high), log=r.log)
    return drawn


def _parse(raw: dict[str, dict[str, Any]]) -> Space:
    try:
        return msgspec.convert(raw, Space)
    except msgspec.ValidationError as exc:
        raise PermanentError(f"invalid search space: {exc}") from None


def _check_against_task(trainer: Trainer, params: dict[str, Any], space: Space) -> None:
    kinds = _field_kinds(trainer)
    coerce_params(params, trainer.params_type)  # what the search leaves fixed is valid
    for name, r in space.items():
        if name not in kinds:
            tunable = ", ".join(sorted(n for n, k in kinds.items() if k != "other"))
            raise PermanentError(
                f"unknown parameter {name!r} in the search space of task {trainer.task!r}"
                f" (numeric parameters: {tunable})"
            )
        if r.choices is None and kinds[name] == "other":
            raise PermanentError(
                f"search space: {name!r} is not a number, so it takes `choices`, not a range"
            )
        if r.choices is None and kinds[name] == "int" and not _integral(r):
            raise PermanentError(f"search space: {name!r} is an integer; its bounds must be too")
        values = r.choices if r.choices is not None else [r.low, r.high]
        for value in values:
            try:
                coerce_params({**params, name: value}, trainer.params_type)
            except PermanentError as exc:
                raise PermanentError(f"search space: {name}={value!r} is refused: {exc}") from None


def _integral(r: ParamRange) -> bool:
    return isinstance(r.low, int) and isinstance(r.high, int)


def _field_kinds(trainer: Trainer) -> dict[str, Literal["int", "float", "other"]]:
    """Each parameter of the task: an integer, a real number, or something else."""
    info = inspect.type_info(trainer.params_type)
    assert isinstance(info, inspect.StructType)
    kinds: dict[str, Literal["int", "float", "other"]] = {}
    for field in info.fields:
        kind = type(field.type)
        kinds[field.name] = (
            "int" if kind is inspect.IntType else "float" if kind is inspect.FloatType else "other"
        )
    return kinds
