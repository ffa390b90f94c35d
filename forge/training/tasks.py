"""The trainer of each training task, by the name a training request's ``task`` gives it.

A task's module is imported when the task is first asked for: loading a classifier
(``forge predict``) needs torch but not scikit-learn, an incremental or clustering
model scikit-learn but not torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

import msgspec

from forge.errors import PermanentError
from forge.training.base import Trainer, coerce_params

# Task -> (module, class) of its trainer.
_TRAINER_CLASSES: dict[str, tuple[str, str]] = {
    "classifier": ("forge.training.classifier", "ClassifierTrainer"),
    "incremental": ("forge.training.incremental", "IncrementalTrainer"),
    "clustering": ("forge.training.clustering", "ClusteringTrainer"),
}


class _Trainers(Mapping[str, Trainer]):
    """Task -> trainer, each made (and its module imported) on first access."""

    def __init__(self) -> None:
        self._made: dict[str, Trainer] = {}

    def __getitem__(self, task: str) -> Trainer:
        if task not in self._made:
            module, name = _TRAINER_CLASSES[task]
            self._made[task] = getattr(importlib.import_module(module), name)()
        return self._made[task]

    def __iter__(self) -> Iterator[str]:
        return iter(_TRAINER_CLASSES)

    def __len__(self) -> int:
        return len(_TRAINER_CLASSES)


TRAINERS: Mapping[str, Trainer] = _Trainers()


def get_trainer(task: str) -> Trainer:
    if task not in _TRAINER_CLASSES:
        raise PermanentError(f"unknown task {task!r} (known: {', '.join(TRAINERS)})")
    return TRAINERS[task]


def parse_params(trainer: Trainer, params: dict[str, Any]) -> msgspec.Struct:
    """Validate a request's ``params`` for ``trainer``; ``PermanentError`` names the
    unknown or invalid field."""
    return coerce_params(params, trainer.params_type)
