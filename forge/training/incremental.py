"""The ``incremental`` task: a linear classifier (scikit-learn ``SGDClassifier``) that
each new version continues with ``partial_fit`` on the rows it is given.

Classes are fixed by the first version: ``partial_fit`` sizes the model for its class
list once and cannot grow it. The first version's classes are the labels in its data
plus any listed in ``params.classes`` (declare future labels there). A later version
whose data holds a label the previous version does not know fails with
``PermanentError`` rather than quietly dropping what was learnt: fit a new model with
``params.fresh`` over the full collection, or use the ``classifier`` task.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import numpy as np
import numpy.typing as npt
import structlog
from msgspec import Meta
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import hinge_loss, log_loss

from forge.errors import PermanentError
from forge.training.base import (
    Dataset,
    Deadline,
    EpochCallback,
    EpochReport,
    Labelled,
    Prediction,
    TaskTrainer,
    TrainedModel,
    TrainerParams,
    TrainingControls,
    Vectors,
    eta_s,
    read_json,
    require_labels,
    write_json,
)
from forge.training.sklearn_io import load_sgd, save_sgd
from forge.training.validation import classification_metrics, stratified_split

log = structlog.get_logger(__name__)

CONFIG_FILE = "config.json"
Labels = npt.NDArray[np.str_]


class IncrementalParams(TrainerParams, frozen=True, kw_only=True, forbid_unknown_fields=True):
    label_field: str
    # log_loss and modified_huber give probabilities; hinge only a margin.
    loss: Literal["log_loss", "modified_huber", "hinge"] = "log_loss"
    alpha: Annotated[float, Meta(gt=0)] = 1e-4
    # Passes over this version's rows.
    epochs: Annotated[int, Meta(ge=1, le=10_000)] = 5
    # Rows per partial_fit call; the deadline is checked between calls.
    batch_size: Annotated[int, Meta(ge=1)] = 1024
    validation_fraction: Annotated[float, Meta(gt=0, lt=1)] = 0.2
    classes: list[str] | None = None


class IncrementalConfig(msgspec.Struct, frozen=True, kw_only=True):
    input_dim: int
    label_field: str
    rows_seen: int
    metrics: dict[str, float] = msgspec.field(default_factory=dict)


class IncrementalModel:
    task = "incremental"
    primary_metric = "val_macro_f1"

    def __init__(self, estimator: SGDClassifier, config: IncrementalConfig) -> None:
        self.estimator = estimator
        self.config = config
        self.metrics: dict[str, float] = dict(config.metrics)

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.estimator.classes_]

    @property
    def input_dim(self) -> int:
        return self.config.input_dim

    @property
    def size_bytes(self) -> int:
        return int(self.estimator.coef_.nbytes + self.estimator.intercept_.nbytes)

    def predict(self, vectors: Vectors) -> list[Prediction]:
        """The best label of each row; its score is the predicted probability, or for
        the hinge loss a softmax of the margins (ranks rows, is not calibrated)."""
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.config.input_dim:
            raise PermanentError(
                f"expected vectors of dimension {self.config.input_dim}, got shape {x.shape}"
            )
        scores = _scores(self.estimator, x)
        best = scores.argmax(axis=1)
        classes = self.classes
        return [Prediction(classes[i], float(scores[row, i])) for row, i in enumerate(best)]

    def save(self, directory: Path) -> None:
        save_sgd(self.estimator, directory)
        config = msgspec.structs.replace(self.config, metrics=self.metrics)
        write_json(directory / CONFIG_FILE, {"task": self.task, **msgspec.to_builtins(config)})

    @classmethod
    def load(cls, directory: Path) -> IncrementalModel:
        config = msgspec.convert(read_json(directory / CONFIG_FILE), IncrementalConfig)
        return cls(load_sgd(directory), config)


def _scores(estimator: SGDClassifier, x: Vectors) -> npt.NDArray[np.float64]:
    if estimator.loss in ("log_loss", "modified_huber"):
        return np.asarray(estimator.predict_proba(x), dtype=np.float64)
    margins = np.asarray(estimator.decision_function(x), dtype=np.float64)
    if margins.ndim == 1:  # binary: one margin, positive for classes_[1]
        margins = np.column_stack([np.zeros_like(margins), margins])
    exp = np.exp(margins - margins.max(axis=1, keepdims=True))
    return np.asarray(exp / exp.sum(axis=1, keepdims=True), dtype=np.float64)


class IncrementalTrainer(TaskTrainer[IncrementalParams, Labelled, IncrementalModel]):
    task = "incremental"
    params_type = IncrementalParams

    def rows(self, data: Dataset, p: IncrementalParams) -> Labelled:
        return require_labels(data, p.label_field, min_rows=p.min_rows)

    def fit(
        self, rows: Labelled, p: IncrementalParams, controls: TrainingControls
    ) -> IncrementalModel:
        labelled, labels = rows
        previous = _previous(controls.warm_start, labelled.dim)
        estimator, classes = _estimator(previous, labels, p)
        train, val = stratified_split(labels, p.validation_fraction, p.seed)
        y = np.asarray(labels)
        train_set = (labelled.vectors[train], y[train])
        val_set = (labelled.vectors[val], y[val])
        epochs_run = _fit(
            estimator, classes, train_set, val_set, p, controls.on_epoch, controls.deadline
        )
        predicted = estimator.predict(val_set[0])
        metrics = classification_metrics(val_set[1].tolist(), predicted.tolist())
        rows_seen = len(train) + (previous.config.rows_seen if previous else 0)
        metrics.update(
            train_loss=_loss(estimator, *train_set),
            epochs_run=float(epochs_run),
            rows_seen=float(rows_seen),
            warm_started=float(previous is not None),
        )
        config = IncrementalConfig(
            input_dim=labelled.dim, label_field=p.label_field, rows_seen=rows_seen, metrics=metrics
        )
        return IncrementalModel(estimator, config)

    def load(self, directory: Path) -> IncrementalModel:
        return IncrementalModel.load(directory)


def _previous(warm_start: TrainedModel | None, dim: int) -> IncrementalModel | None:
    if not isinstance(warm_start, IncrementalModel):
        return None
    if warm_start.config.input_dim != dim:
        log.warning(
            "warm start skipped: vector dimension changed",
            previous=warm_start.config.input_dim,
            new=dim,
        )
        return None
    return warm_start


def _estimator(
    previous: IncrementalModel | None, labels: list[str], p: IncrementalParams
) -> tuple[SGDClassifier, Labels]:
    """The estimator to continue (a copy: the previous version may still be serving)
    and its full class list."""
    wanted = set(labels) | set(p.classes or [])
    if previous is None:
        estimator = SGDClassifier(loss=p.loss, alpha=p.alpha, random_state=p.seed)
        return estimator, np.asarray(sorted(wanted))
    unseen = sorted(wanted - set(previous.classes))
    if unseen:
        raise PermanentError(
            f"labels {unseen} are unknown to the previous version (classes {previous.classes}); "
            "an incremental model cannot add classes: retrain with params.fresh=true over "
            "the whole collection (declaring future labels in params.classes), or use the "
            "classifier task"
        )
    estimator = copy.deepcopy(previous.estimator)
    estimator.set_params(loss=p.loss, alpha=p.alpha)
    return estimator, np.asarray(estimator.classes_)


def _fit(
    estimator: SGDClassifier,
    classes: Labels,
    train_set: tuple[Vectors, Labels],
    val_set: tuple[Vectors, Labels],
    p: IncrementalParams,
    on_epoch: EpochCallback,
    deadline: Deadline,
) -> int:
    """``p.epochs`` shuffled passes of ``partial_fit``; returns the passes made."""
    (x, y), (x_val, y_val) = train_set, val_set
    rng = np.random.default_rng(p.seed)
    started_s = time.monotonic()
    for epoch in range(1, p.epochs + 1):
        order = rng.permutation(len(x))
        for start in range(0, len(order), p.batch_size):
            deadline.check()
            rows = order[start : start + p.batch_size]
            estimator.partial_fit(x[rows], y[rows], classes=classes)
        accuracy = float(np.mean(estimator.predict(x_val) == y_val))
        report = EpochReport(
            epoch, p.epochs, _loss(estimator, x, y), accuracy, eta_s(started_s, epoch, p.epochs)
        )
        on_epoch(report)
    return p.epochs


def _loss(estimator: SGDClassifier, x: Vectors, y: Labels) -> float:
    """The training objective's data term: log loss of the probabilities, or the
    multi-class hinge loss of the margins."""
    labels = estimator.classes_
    if estimator.loss in ("log_loss", "modified_huber"):
        return float(log_loss(y, estimator.predict_proba(x), labels=labels))
    return float(hinge_loss(y, estimator.decision_function(x), labels=labels))
