"""Hold-out validation for the classification tasks: a seeded stratified split and the
metrics champion promotion compares."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from forge.errors import PermanentError

Index = npt.NDArray[np.intp]


def stratified_split(labels: Sequence[str], fraction: float, seed: int) -> tuple[Index, Index]:
    """Row indices ``(train, validation)`` with about ``fraction`` of each class held out.

    Every class with two or more rows puts at least one in validation and keeps at
    least one for training; a class seen once trains only (it cannot be both).
    """
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for row, label in enumerate(labels):
        by_class.setdefault(label, []).append(row)
    train: list[int] = []
    val: list[int] = []
    for label in sorted(by_class):
        rows = rng.permutation(by_class[label])
        held = 0 if len(rows) < 2 else min(max(1, round(fraction * len(rows))), len(rows) - 1)
        val.extend(rows[:held].tolist())
        train.extend(rows[held:].tolist())
    if not val:
        raise PermanentError("too few rows per class to hold any out for validation")
    return np.sort(np.asarray(train, dtype=np.intp)), np.sort(np.asarray(val, dtype=np.intp))


def classification_metrics(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    """``val_accuracy`` and ``val_macro_f1`` (classes weighted equally, so a rare class
    that is always missed costs as much as a common one)."""
    # Imported here: the split and the classifier's predictions need no scikit-learn
    # (seconds to import), only the end of a training does.
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "val_accuracy": float(accuracy_score(truth, predicted)),
        "val_macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
    }
