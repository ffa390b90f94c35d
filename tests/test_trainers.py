"""The training tasks on scikit-learn's bundled digits (1797 8x8 images, 10 classes)."""

from __future__ import annotations

import math
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skops.io
import torch
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from forge.errors import PermanentError
from forge.training import sklearn_io
from forge.training.base import (
    Dataset,
    Deadline,
    EpochReport,
    TrainedModel,
    Trainer,
    TrainingTimeout,
)
from forge.training.classifier import ClassifierParams
from forge.training.classifier_model import ClassifierModel
from forge.training.clustering import ClusteringModel
from forge.training.incremental import IncrementalModel
from forge.training.losses import FocalLoss, LossOptions, get_loss
from forge.training.tasks import TRAINERS, get_trainer, parse_params

LABEL = "digit"
# Trainings that do not test the deadline get none: a bound on the wall clock would
# fail them on a machine slow enough.
NO_DEADLINE = Deadline(math.inf)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny batches: more threads only add synchronisation, and on a busy machine
    # oversubscription makes each step many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):  # the same for scikit-learn's OpenMP/BLAS pools
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Shuffled so row ranges are fair samples; scaled to [0, 1] like embedding values.
    order = np.random.default_rng(0).permutation(len(bunch.target))
    vectors = (bunch.data[order] / 16).astype(np.float32)
    metadata = [{LABEL: int(t), "row": i} for i, t in enumerate(bunch.target[order])]
    return Dataset([f"d{i}" for i in range(len(order))], vectors, metadata)


def _train(
    task: str,
    data: Dataset,
    params: dict[str, Any],
    *,
    warm_start: TrainedModel | None = None,
    reports: list[EpochReport] | None = None,
    deadline: Deadline = NO_DEADLINE,
    on_epoch: Callable[[EpochReport], None] = lambda report: None,
) -> Any:
    trainer = get_trainer(task)
    sink = reports if reports is not None else []

    def report(epoch: EpochReport) -> None:
        sink.append(epoch)
        on_epoch(epoch)

    return trainer.train(
        data,
        parse_params(trainer, params),
        warm_start=warm_start,
        on_epoch=report,
        deadline=deadline,
    )


class FakeClock:
    """A monotonic clock that moves only when told: ``tick`` advances it one second."""

    def __init__(self, limit_s: float) -> None:
        self.now_s = 0.0
        self.limit_s = limit_s

    def __call__(self) -> float:
        return self.now_s

    def tick(self, report: EpochReport | None = None) -> None:
        self.now_s += 1.0
        # A training the deadline failed to stop fails here instead of running on.
        assert self.now_s <= self.limit_s, "the deadline did not stop the training"


def _truth(data: Dataset) -> np.ndarray:
    return np.asarray([str(m[LABEL]) for m in data.metadata])


def _accuracy(model: TrainedModel, data: Dataset) -> float:
    predicted = np.asarray([p.label for p in model.predict(data.vectors)])
    return float(np.mean(predicted == _truth(data)))


def _assert_no_pickle(directory: Path) -> None:
    """No file, nor any member of a zip (npz, skops), is or holds a pickle."""
    for path in directory.iterdir():
        assert path.suffix not in {".pkl", ".pickle", ".joblib", ".pt"}, path.name
        assert path.read_bytes()[:1] != b"\x80", f"{path.name} looks like a pickle"
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.endswith(".pkl")]
                assert not pickles, f"{path.name} holds {pickles}"
        if path.suffix in {".npy", ".npz"}:
            np.load(path, allow_pickle=False)  # object arrays would need pickle


@pytest.fixture(scope="module")
def classifier(digits: Dataset) -> tuple[ClassifierModel, list[EpochReport]]:
    reports: list[EpochReport] = []
    model = _train("classifier", digits, {"label_field": LABEL, "epochs": 20}, reports=reports)
    return model, reports


# ------------------------------------------------------------------------- dataset


def test_labels_keeps_rows_with_a_value_as_strings() -> None:
    data = Dataset(
        ["a", "b", "c", "d"],
        np.eye(4, dtype=np.float32),
        [{"y": 1}, {"y": None}, {}, {"y": "1"}],
    )
    labelled, labels = data.labels("y")
    assert labelled.ids == ["a", "d"]
    assert labels == ["1", "1"]
    np.testing.assert_array_equal(labelled.vectors, data.vectors[[0, 3]])


def test_dataset_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="one entry per row"):
        Dataset(["a"], np.zeros((2, 3), dtype=np.float32), [{}])


# --------------------------------------------------------------- tasks and params


def test_tasks_name_the_three_trainers() -> None:
    assert set(TRAINERS) == {"classifier", "incremental", "clustering"}
    for task, trainer in TRAINERS.items():
        assert trainer.task == task


def test_unknown_task_is_permanent() -> None:
    with pytest.raises(PermanentError, match=r"unknown task 'regression' \(known: classifier"):
        get_trainer("regression")


@pytest.mark.parametrize("task", ["classifier", "incremental", "clustering"])
def test_unknown_parameter_is_permanent(task: str) -> None:
    params = {"label_field": LABEL, "n_clusters": 3, "learning_rte": 0.1}
    if task != "clustering":
        params.pop("n_clusters")
    else:
        params.pop("label_field")
    with pytest.raises(PermanentError, match="learning_rte"):
        parse_params(get_trainer(task), params)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({}, "label_field"),
        ({"label_field": LABEL, "epochs": 0}, "epochs"),
        ({"label_field": LABEL, "dropout": "lots"}, "dropout"),
    ],
)
def test_invalid_parameter_is_permanent(params: dict[str, Any], match: str) -> None:
    with pytest.raises(PermanentError, match=match):
        parse_params(get_trainer("classifier"), params)


def test_parse_params_applies_defaults() -> None:
    params = parse_params(get_trainer("classifier"), {"label_field": LABEL})
    assert isinstance(params, ClassifierParams)
    assert (params.hidden_dim, params.batch_size, params.patience) == (256, 64, 5)


# ------------------------------------------------------------------------- losses


def test_unknown_loss_is_permanent(digits: Dataset) -> None:
    with pytest.raises(PermanentError, match=r"unknown loss 'hinge' \(known: cross_entropy"):
        parse_params(get_trainer("classifier"), {"label_field": LABEL, "loss": "hinge"})
    with pytest.raises(PermanentError, match="unknown loss"):
        get_loss("hinge")


def test_focal_loss_with_gamma_zero_is_weighted_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    logits, target = torch.randn(32, 5, generator=gen), torch.randint(0, 5, (32,), generator=gen)
    weights = torch.rand(5, generator=gen) + 0.5
    focal = FocalLoss(gamma=0.0, weight=weights)(logits, target)
    expected = torch.nn.functional.cross_entropy(logits, target, weight=weights)
    torch.testing.assert_close(focal, expected)


def test_focal_loss_discounts_easy_rows() -> None:
    target = torch.tensor([0, 0])
    easy_and_hard = torch.tensor([[6.0, 0.0], [0.0, 0.0]])
    per_row = [FocalLoss(gamma=2.0)(easy_and_hard[i : i + 1], target[i : i + 1]) for i in range(2)]
    ce = [
        torch.nn.functional.cross_entropy(easy_and_hard[i : i + 1], target[i : i + 1])
        for i in range(2)
    ]
    # Focal shrinks the confident row's loss far more than the uncertain one's.
    assert per_row[0] / ce[0] < 0.01
    assert per_row[1] / ce[1] > 0.2


@pytest.mark.parametrize("loss", ["cross_entropy", "label_smoothing", "focal"])
def test_each_loss_trains(digits: Dataset, loss: str) -> None:
    params = {"label_field": LABEL, "loss": loss, "epochs": 4, "class_weights": "balanced"}
    model = _train("classifier", digits, params)
    assert model.metrics["val_accuracy"] > 0.85
    assert np.isfinite(model.metrics["train_loss"])
    assert isinstance(get_loss(loss, LossOptions()), torch.nn.Module)


# --------------------------------------------------------------------- classifier


def test_classifier_learns_digits(classifier: tuple[ClassifierModel, list[EpochReport]]) -> None:
    model, _ = classifier
    assert model.metrics["val_accuracy"] > 0.9
    assert model.primary_metric == "val_macro_f1"
    assert model.metrics["val_macro_f1"] > 0.9
    for key in ("train_loss", "val_loss", "epochs_run"):
        assert key in model.metrics
    assert model.labels == [str(d) for d in range(10)]
    assert model.size_bytes == 4 * (64 * 256 + 256 + 256 * 10 + 10)


def test_on_epoch_reports_the_curve(classifier: tuple[ClassifierModel, list[EpochReport]]) -> None:
    model, reports = classifier
    assert [r.epoch for r in reports] == list(range(1, len(reports) + 1))
    assert len(reports) == model.metrics["epochs_run"]
    assert all(r.epochs == 20 for r in reports)
    assert all(r.loss > 0 and r.metric is not None and 0 <= r.metric <= 1 for r in reports)
    assert all(r.eta_s is not None and r.eta_s >= 0 for r in reports)
    assert reports[-1].eta_s == 0
    assert reports[-1].loss < reports[0].loss
    assert reports[-1].metric is not None
    assert reports[0].metric is not None
    assert reports[-1].metric > reports[0].metric


def test_early_stopping_ends_training(digits: Dataset) -> None:
    params = {"label_field": LABEL, "epochs": 200, "patience": 2, "learning_rate": 0.01}
    model = _train("classifier", digits, params)
    assert model.metrics["epochs_run"] < 200
    assert model.metrics["epochs_run"] - model.metrics["best_epoch"] == 2


def test_classifier_is_deterministic(digits: Dataset) -> None:
    params = {"label_field": LABEL, "epochs": 2}
    first, second = _train("classifier", digits, params), _train("classifier", digits, params)
    assert first.metrics == second.metrics


def test_classifier_round_trip_without_pickle(
    classifier: tuple[ClassifierModel, list[EpochReport]], digits: Dataset, tmp_path: Path
) -> None:
    model, _ = classifier
    model.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    _assert_no_pickle(tmp_path)
    loaded = get_trainer("classifier").load(tmp_path)
    assert loaded.predict(digits.vectors) == model.predict(digits.vectors)
    assert loaded.metrics == model.metrics


def test_classifier_fallback_without_safetensors(
    classifier: tuple[ClassifierModel, list[EpochReport]],
    digits: Dataset,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _ = classifier
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import now fails
    model.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.pt"}
    # A plain state dict: loads with the restricted, non-executing unpickler.
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(state) == {"hidden.weight", "hidden.bias", "output.weight", "output.bias"}
    loaded = get_trainer("classifier").load(tmp_path)
    assert loaded.predict(digits.vectors[:50]) == model.predict(digits.vectors[:50])


def test_warm_start_starts_ahead_and_grows_labels(digits: Dataset) -> None:
    first_eight = digits.subset([i for i, m in enumerate(digits.metadata) if m[LABEL] < 8])
    v1 = _train("classifier", first_eight, {"label_field": LABEL, "epochs": 10})
    params = {"label_field": LABEL, "epochs": 3}
    cold_curve: list[EpochReport] = []
    warm_curve: list[EpochReport] = []
    cold = _train("classifier", digits, params, reports=cold_curve)
    warm = _train("classifier", digits, params, warm_start=v1, reports=warm_curve)
    assert warm.labels == [str(d) for d in range(10)]
    assert warm.metrics["warm_start_classes"] == 8
    assert cold.metrics["warm_start_classes"] == 0
    assert warm_curve[0].metric is not None
    assert cold_curve[0].metric is not None
    assert warm_curve[0].metric > cold_curve[0].metric
    assert warm_curve[0].loss < cold_curve[0].loss


def test_warm_start_skipped_when_layers_differ(
    classifier: tuple[ClassifierModel, list[EpochReport]], digits: Dataset
) -> None:
    v1, _ = classifier
    params = {"label_field": LABEL, "epochs": 1, "hidden_dim": 32}
    assert _train("classifier", digits, params, warm_start=v1).metrics["warm_start_classes"] == 0


def test_divergence_is_permanent(digits: Dataset) -> None:
    params = {"label_field": LABEL, "learning_rate": 1e30, "epochs": 3}
    with pytest.raises(PermanentError, match="diverged"):
        _train("classifier", digits, params)


# -------------------------------------------------------------- failures for all


def test_predict_rejects_vectors_of_another_dimension(
    classifier: tuple[ClassifierModel, list[EpochReport]], digits: Dataset
) -> None:
    model, _ = classifier
    with pytest.raises(PermanentError, match="dimension 64"):
        model.predict(np.zeros((2, 32), dtype=np.float32))


@pytest.mark.parametrize("task", ["classifier", "incremental"])
def test_too_few_labelled_rows(digits: Dataset, task: str) -> None:
    few = Dataset(
        digits.ids[:30],
        digits.vectors[:30],
        [{LABEL: m[LABEL]} if i < 10 else {} for i, m in enumerate(digits.metadata[:30])],
    )
    with pytest.raises(PermanentError, match="too few labelled rows: 10"):
        _train(task, few, {"label_field": LABEL})
    one_class = Dataset(digits.ids[:30], digits.vectors[:30], [{LABEL: 1}] * 30)
    with pytest.raises(PermanentError, match="at least 2 classes"):
        _train(task, one_class, {"label_field": LABEL})
    with pytest.raises(PermanentError, match="label field 'colour' is missing"):
        _train(task, digits, {"label_field": "colour"})


def test_clustering_too_few_rows(digits: Dataset) -> None:
    with pytest.raises(PermanentError, match="too few rows"):
        _train("clustering", digits.subset(range(15)), {"n_clusters": 3})


@pytest.mark.parametrize(
    ("task", "params"),
    [
        ("classifier", {"label_field": LABEL}),
        ("incremental", {"label_field": LABEL}),
        ("clustering", {"n_clusters": 10}),
    ],
)
def test_past_deadline_times_out_promptly(
    digits: Dataset, task: str, params: dict[str, Any]
) -> None:
    # The real clock, read through a counter: "promptly" is "at the first check,
    # before any work", which holds however slow the machine is.
    reads: list[float] = []

    def clock() -> float:
        reads.append(time.monotonic())
        return reads[-1]

    deadline = Deadline.after(-1.0, clock)
    reports: list[EpochReport] = []
    with pytest.raises(TrainingTimeout):
        _train(task, digits, params, reports=reports, deadline=deadline)
    assert len(reads) == 2, "it timed out at its first check"
    assert reports == []
    assert issubclass(TrainingTimeout, PermanentError)


@pytest.mark.parametrize(
    ("task", "params"),
    [
        ("classifier", {"label_field": LABEL, "epochs": 100_000, "patience": 100_000}),
        ("incremental", {"label_field": LABEL, "epochs": 10_000, "batch_size": 16}),
        ("clustering", {"n_clusters": 10, "max_iter": 100_000, "tol": 0, "batch_size": 64}),
    ],
)
def test_deadline_stops_a_running_training(
    digits: Dataset, task: str, params: dict[str, Any]
) -> None:
    # The clock moves one second per epoch, so the deadline 2.5 s away passes during
    # the third epoch's report, whatever the machine's speed, and the training must
    # stop at its next check, the first of the fourth epoch.
    clock = FakeClock(limit_s=10.0)
    reports: list[EpochReport] = []
    with pytest.raises(TrainingTimeout, match=r"past its deadline by 0\.5s"):
        _train(
            task,
            digits,
            params,
            reports=reports,
            deadline=Deadline.after(2.5, clock),
            on_epoch=clock.tick,
        )
    assert reports, "it trained for a while before the deadline"
    assert [report.epoch for report in reports] == [1, 2, 3]


def test_deadline_runs_on_the_monotonic_clock() -> None:
    # What production uses: no clock argument means time.monotonic.
    Deadline.after(3600.0).check()
    with pytest.raises(TrainingTimeout, match="past its deadline"):
        Deadline.after(-1.0).check()
    assert Deadline.after(0.0).clock is time.monotonic


# -------------------------------------------------------------------- incremental


def _chunks(digits: Dataset) -> tuple[Dataset, Dataset, Dataset]:
    return (
        digits.subset(range(600)),
        digits.subset(range(600, 1400)),
        digits.subset(range(1400, 1797)),
    )


def test_incremental_continues_on_new_rows(digits: Dataset) -> None:
    first, second, held_out = _chunks(digits)
    params = {"label_field": LABEL, "alpha": 1e-3}
    reports: list[EpochReport] = []
    v1 = _train("incremental", first, params, reports=reports)
    before = v1.predict(held_out.vectors)
    v2 = _train("incremental", second, params, warm_start=v1)
    assert isinstance(v2, IncrementalModel)
    assert v2.classes == [str(d) for d in range(10)]
    assert _accuracy(v2, held_out) >= _accuracy(v1, held_out) > 0.85
    assert v2.metrics["warm_started"] == 1
    assert v1.metrics["warm_started"] == 0
    # About 80% of each chunk trains; the rest validates.
    assert v2.metrics["rows_seen"] - v1.metrics["rows_seen"] == pytest.approx(640, abs=5)
    assert v1.predict(held_out.vectors) == before, "the previous version is left untouched"
    assert [r.epoch for r in reports] == [1, 2, 3, 4, 5]
    assert {"val_accuracy", "val_macro_f1", "train_loss"} <= set(v2.metrics)


def test_incremental_cannot_add_classes(digits: Dataset) -> None:
    first, second, _ = _chunks(digits)
    low = first.subset([i for i, m in enumerate(first.metadata) if m[LABEL] < 5])
    v1 = _train("incremental", low, {"label_field": LABEL})
    with pytest.raises(PermanentError, match=r"labels \['5', .*cannot add classes"):
        _train("incremental", second, {"label_field": LABEL}, warm_start=v1)
    fresh = _train("incremental", second, {"label_field": LABEL, "fresh": True}, warm_start=v1)
    assert fresh.metrics["warm_started"] == 0
    assert len(fresh.classes) == 10
    declared = {"label_field": LABEL, "classes": [str(d) for d in range(10)]}
    v1_all = _train("incremental", low, declared)
    assert len(v1_all.classes) == 10
    v2 = _train("incremental", second, {"label_field": LABEL}, warm_start=v1_all)
    assert v2.metrics["warm_started"] == 1


@pytest.mark.parametrize("with_skops", [True, False])
def test_incremental_round_trip_without_pickle(
    digits: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_skops: bool
) -> None:
    monkeypatch.setattr(sklearn_io, "skops_available", lambda: with_skops)
    first, second, held_out = _chunks(digits)
    params = {"label_field": LABEL, "loss": "hinge"}
    v1 = _train("incremental", first, params)
    v1.save(tmp_path)
    saved = {"estimator.skops"} if with_skops else {"estimator.npz", "estimator.json"}
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", *saved}
    _assert_no_pickle(tmp_path)
    loaded = get_trainer("incremental").load(tmp_path)
    assert loaded.predict(held_out.vectors) == v1.predict(held_out.vectors)
    assert loaded.metrics == v1.metrics
    # Continuing from the loaded copy is the same as continuing from the original.
    from_loaded = _train("incremental", second, params, warm_start=loaded)
    from_memory = _train("incremental", second, params, warm_start=v1)
    assert from_loaded.predict(held_out.vectors) == from_memory.predict(held_out.vectors)


def test_skops_refuses_untrusted_types(tmp_path: Path) -> None:
    skops.io.dump({"payload": Path("/etc/passwd")}, tmp_path / "estimator.skops")
    with pytest.raises(PermanentError, match="untrusted types"):
        sklearn_io.load_sgd(tmp_path)


# --------------------------------------------------------------------- clustering


def test_clustering_digits(digits: Dataset, tmp_path: Path) -> None:
    reports: list[EpochReport] = []
    model = _train("clustering", digits, {"n_clusters": 10}, reports=reports)
    assert isinstance(model, ClusteringModel)
    assert model.primary_metric == "silhouette"
    assert set(model.assignments) == set(digits.ids)
    assert set(model.assignments.values()) == set(range(10))
    assert 0.05 < model.metrics["silhouette"] <= 1
    assert model.metrics["inertia"] > 0
    assert reports
    assert all(r.metric is None and r.loss > 0 for r in reports)
    predictions = model.predict(digits.vectors)
    assert [p.label for p in predictions] == [f"cluster-{model.assignments[i]}" for i in digits.ids]
    assert all(p.score <= 0 for p in predictions)

    model.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "centers.npy"}
    _assert_no_pickle(tmp_path)
    loaded = get_trainer("clustering").load(tmp_path)
    assert loaded.predict(digits.vectors) == predictions
    assert loaded.metrics == model.metrics


def test_clustering_warm_start_keeps_cluster_numbers(digits: Dataset) -> None:
    first = digits.subset(range(1200))
    v1 = _train("clustering", first, {"n_clusters": 10})
    v2 = _train("clustering", digits, {"n_clusters": 10}, warm_start=v1)
    assert v2.metrics["warm_started"] == 1
    same = np.mean([v1.assignments[i] == v2.assignments[i] for i in first.ids])
    assert same > 0.9


def test_trainers_satisfy_the_protocol() -> None:
    trainers: list[Trainer] = list(TRAINERS.values())
    assert all(hasattr(t, "params_type") for t in trainers)
