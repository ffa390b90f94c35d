"""What every trainer shares: the dataset it is given, the model it returns, the
parameters every task has, the rules for giving up (too little data, past the
deadline) and ``TaskTrainer``, the opening every task's ``train`` goes through.

Trainers are pure ML: the caller loads a collection into a ``Dataset``, hands over the
previous model version (if any) for warm starts, and persists the ``TrainedModel``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, Protocol, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt
from msgspec import Meta

from forge.errors import PermanentError

Vectors = npt.NDArray[np.float32]
# Labelled rows and their labels, as strings (``Dataset.labels``).
Labelled = tuple["Dataset", list[str]]


class TrainingTimeout(PermanentError):
    """The training ran past its deadline; retrying would only time out again."""


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    score: float


@dataclass(frozen=True)
class Dataset:
    """A collection's rows, as loaded by the caller: row ``i`` is ``ids[i]``,
    ``vectors[i]`` and ``metadata[i]``."""

    ids: list[str]
    vectors: Vectors
    metadata: list[dict[str, Any]]

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors must be 2-D (rows, dim), got shape {self.vectors.shape}")
        rows = {len(self.ids), len(self.metadata), self.vectors.shape[0]}
        if len(rows) != 1:
            raise ValueError(
                f"ids ({len(self.ids)}), vectors ({self.vectors.shape[0]}) and metadata "
                f"({len(self.metadata)}) must have one entry per row"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def subset(self, rows: Sequence[int] | npt.NDArray[np.integer[Any]]) -> Dataset:
        index = np.asarray(rows, dtype=np.intp)
        return Dataset(
            ids=[self.ids[i] for i in index],
            vectors=np.ascontiguousarray(self.vectors[index], dtype=np.float32),
            metadata=[self.metadata[i] for i in index],
        )

    def labels(self, field: str) -> Labelled:
        """The rows whose ``metadata[field]`` is present and not null, and those
        labels as strings (so 3 and "3" are one class)."""
        rows = [i for i, meta in enumerate(self.metadata) if meta.get(field) is not None]
        return self.subset(rows), [str(self.metadata[i][field]) for i in rows]


@dataclass(frozen=True, slots=True)
class EpochReport:
    """One point of a training curve (maps onto ``forge.events.TrainingProgress``).

    ``epoch`` counts from 1; ``epochs`` is the planned maximum (early stopping may end
    sooner); ``metric`` is the task's validation metric when it has one per epoch."""

    epoch: int
    epochs: int
    loss: float
    metric: float | None
    eta_s: float | None


EpochCallback = Callable[[EpochReport], None]


class TrainedModel(Protocol):
    task: str
    # Every metric of a model; ``primary_metric`` names the one champion promotion
    # compares, and for every task higher is better.
    metrics: dict[str, float]
    primary_metric: str

    def save(self, directory: Path) -> None: ...

    def predict(self, vectors: Vectors) -> list[Prediction]: ...

    @property
    def input_dim(self) -> int:
        """The dimension of the vectors ``predict`` takes."""
        ...

    @property
    def size_bytes(self) -> int: ...


class Trainer(Protocol):
    task: str

    @property
    def params_type(self) -> type[msgspec.Struct]:
        """Hyperparameters; structs forbid unknown fields so a typo is an error, not a
        no-op."""
        ...

    def train(
        self,
        data: Dataset,
        params: Any,
        *,
        warm_start: TrainedModel | None,
        on_epoch: EpochCallback,
        deadline: Deadline,
        device: str | None = None,
    ) -> TrainedModel: ...

    def load(self, directory: Path) -> TrainedModel: ...

    def gpu_memory_bytes(self, data: Dataset, params: Any) -> int | None:
        """GPU memory a training on ``data`` would need, for GPU admission; None for a
        task that never uses a GPU."""
        ...


@dataclass(frozen=True, slots=True)
class Deadline:
    """The moment ``at_s`` on ``clock`` by which a training must have stopped.

    Trainers call ``check()`` between steps. The clock is ``time.monotonic`` in
    production; tests pass one they advance themselves, so that when the deadline
    trips does not depend on how fast the machine trains.
    """

    at_s: float
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def after(cls, budget_s: float, clock: Callable[[], float] = time.monotonic) -> Deadline:
        return cls(clock() + budget_s, clock)

    def check(self) -> None:
        """Raise ``TrainingTimeout`` once the clock has passed ``at_s``."""
        now = self.clock()
        if now > self.at_s:
            raise TrainingTimeout(f"training ran past its deadline by {now - self.at_s:.1f}s")


def eta_s(started_s: float, done: int, total: int) -> float | None:
    """Remaining seconds if the rest goes as fast as what is done so far."""
    if done <= 0:
        return None
    return (time.monotonic() - started_s) / done * max(total - done, 0)


def require_labels(data: Dataset, field: str, *, min_rows: int, min_classes: int = 2) -> Labelled:
    """The labelled rows of ``data``, or a ``PermanentError`` saying why there are too
    few of them to train on."""
    labelled, labels = data.labels(field)
    if len(data) and not len(labelled):
        raise PermanentError(f"label field {field!r} is missing or null in all {len(data)} rows")
    if len(labelled) < min_rows:
        raise PermanentError(
            f"too few labelled rows: {len(labelled)} rows have {field!r}, need {min_rows}"
        )
    classes = sorted(set(labels))
    if len(classes) < min_classes:
        raise PermanentError(
            f"need at least {min_classes} classes in {field!r}, found {len(classes)}: {classes}"
        )
    return labelled, labels


def write_json(path: Path, value: Any) -> None:
    path.write_bytes(msgspec.json.format(msgspec.json.encode(value), indent=2))


def read_json(path: Path) -> Any:
    try:
        return msgspec.json.decode(path.read_bytes())
    except FileNotFoundError:
        raise PermanentError(f"not a saved model: {path} is missing") from None


P = TypeVar("P", bound=msgspec.Struct)


def coerce_params(params: Any, params_type: type[P]) -> P:
    """``params`` as ``params_type``: a struct passes through, a mapping is validated
    (unknown or invalid fields raise ``PermanentError`` with msgspec's message)."""
    if isinstance(params, params_type):
        return params
    try:
        return msgspec.convert(params, params_type)
    except msgspec.ValidationError as exc:
        raise PermanentError(f"invalid training parameters: {exc}") from None


class TrainerParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The parameters of every task, beside its own."""

    seed: int = 0
    # Rows a training needs (labelled rows, for the classification tasks).
    min_rows: Annotated[int, Meta(ge=2)] = 20
    # Train from scratch: ignore the previous version even when it could be continued.
    fresh: bool = False


@dataclass(frozen=True, slots=True)
class TrainingControls:
    """How the caller steers a training: where it starts (``None``: from scratch), whom
    it tells of each epoch, when it must have stopped, and the device GPU admission
    gave it (``None``: the trainer's own choice)."""

    warm_start: TrainedModel | None
    on_epoch: EpochCallback
    deadline: Deadline
    device: str | None = None


Params = TypeVar("Params", bound=TrainerParams)
Rows = TypeVar("Rows")
Model = TypeVar("Model", bound=TrainedModel)


class TaskTrainer(ABC, Generic[Params, Rows, Model]):
    """A ``Trainer`` whose ``train`` opens as every task's does: parameters validated,
    the rows to train on picked (too few of them fail before any work is done), the
    deadline checked, and the warm start dropped when the parameters ask for a
    ``fresh`` model. A task supplies ``rows``, ``fit`` and ``load``."""

    task: str
    params_type: type[Params]

    def train(
        self,
        data: Dataset,
        params: Any,
        *,
        warm_start: TrainedModel | None,
        on_epoch: EpochCallback,
        deadline: Deadline,
        device: str | None = None,
    ) -> Model:
        p = coerce_params(params, self.params_type)
        rows = self.rows(data, p)
        deadline.check()
        controls = TrainingControls(None if p.fresh else warm_start, on_epoch, deadline, device)
        return self.fit(rows, p, controls)

    def gpu_memory_bytes(self, data: Dataset, params: Any) -> int | None:
        """GPU memory a training on ``data`` would need; None: this task uses no GPU."""
        return None

    @abstractmethod
    def rows(self, data: Dataset, p: Params) -> Rows:
        """What of ``data`` this task trains on; ``PermanentError`` when it is too little."""

    @abstractmethod
    def fit(self, rows: Rows, p: Params, controls: TrainingControls) -> Model:
        """Train on ``rows``, calling ``controls.deadline.check()`` between steps."""

    @abstractmethod
    def load(self, directory: Path) -> Model: ...
