"""Pickle-free persistence of an ``SGDClassifier``.

With skops installed the estimator is saved with ``skops.io`` and loaded trusting only
scikit-learn and NumPy types. Without it, the fitted state that prediction and further
``partial_fit`` calls need (coefficients, intercepts, classes, step count and the
constructor parameters) is written as ``.npz`` (no object arrays) plus JSON.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import SGDClassifier

from forge.errors import PermanentError
from forge.training.base import read_json, write_json

SKOPS_FILE = "estimator.skops"
ARRAYS_FILE = "estimator.npz"
STATE_FILE = "estimator.json"
_TRUSTED_PREFIXES = ("sklearn.", "numpy.")


def skops_available() -> bool:
    return importlib.util.find_spec("skops") is not None


def save_sgd(estimator: SGDClassifier, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if skops_available():
        import skops.io

        skops.io.dump(estimator, directory / SKOPS_FILE)
    else:
        _save_state(estimator, directory)


def load_sgd(directory: Path) -> SGDClassifier:
    if (directory / SKOPS_FILE).exists():
        return _load_skops(directory / SKOPS_FILE)
    if (directory / ARRAYS_FILE).exists():
        return _load_state(directory)
    raise PermanentError(f"not a saved incremental model: no estimator in {directory}")


def _load_skops(path: Path) -> SGDClassifier:
    if not skops_available():
        raise PermanentError(f"{path} was saved with skops, which is not installed")
    import skops.io

    types: list[str] = skops.io.get_untrusted_types(file=path)
    refused = [t for t in types if not t.startswith(_TRUSTED_PREFIXES)]
    if refused:
        raise PermanentError(f"refusing to load {path}: it contains untrusted types {refused}")
    estimator = skops.io.load(path, trusted=types)
    if not isinstance(estimator, SGDClassifier):
        raise PermanentError(f"{path} holds a {type(estimator).__name__}, not an SGDClassifier")
    return estimator


def _save_state(estimator: SGDClassifier, directory: Path) -> None:
    np.savez(directory / ARRAYS_FILE, coef=estimator.coef_, intercept=estimator.intercept_)
    state: dict[str, Any] = {
        "params": estimator.get_params(),
        "classes": [str(c) for c in estimator.classes_],
        "t": float(estimator.t_),
        "n_iter": float(estimator.n_iter_),
    }
    write_json(directory / STATE_FILE, state)


def _load_state(directory: Path) -> SGDClassifier:
    state = read_json(directory / STATE_FILE)
    with np.load(directory / ARRAYS_FILE, allow_pickle=False) as arrays:
        coef, intercept = arrays["coef"], arrays["intercept"]
    estimator = SGDClassifier(**state["params"])
    # The attributes partial_fit and predict read; partial_fit continues the learning
    # rate schedule from ``t_``.
    estimator.coef_ = coef
    estimator.intercept_ = intercept
    estimator.classes_ = np.asarray(state["classes"])
    estimator.t_ = state["t"]
    estimator.n_iter_ = state["n_iter"]
    estimator.n_features_in_ = coef.shape[1]
    return estimator
