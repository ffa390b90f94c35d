"""The trainer of each training task, by the name a training request's ``task`` gives it."""

from __future__ import annotations

from typing import Any

import msgspec

from forge.errors import PermanentError
from forge.training.base import Trainer, coerce_params
from forge.training.classifier import ClassifierTrainer
from forge.training.clustering import ClusteringTrainer
from forge.training.incremental import IncrementalTrainer

TRAINERS: dict[str, Trainer] = {
    trainer.task: trainer
    for trainer in (ClassifierTrainer(), IncrementalTrainer(), ClusteringTrainer())
}


def get_trainer(task: str) -> Trainer:
    trainer = TRAINERS.get(task)
    if trainer is None:
        raise PermanentError(f"unknown task {task!r} (known: {', '.join(TRAINERS)})")
    return trainer


def parse_params(trainer: Trainer, params: dict[str, Any]) -> msgspec.Struct:
    """Validate a request's ``params`` for ``trainer``; ``PermanentError`` names the
    unknown or invalid field."""
    return coerce_params(params, trainer.params_type)
