"""Training: the tasks (pure ML over a collection's vectors) and the MLflow side.

The trainers (``base``, ``classifier``, ``incremental``, ``clustering``) know nothing
of Redis or MLflow; ``forge.training.tasks`` maps a training request's ``task`` to its
``Trainer`` (importing it loads torch and scikit-learn). ``service`` runs a trainer
inside an MLflow run and registers the result (``versions``, ``promotion``). The types
here are cheap to import.
"""

from forge.training.base import (
    Dataset,
    EpochReport,
    Prediction,
    TrainedModel,
    Trainer,
    TrainingTimeout,
)

__all__ = ["Dataset", "EpochReport", "Prediction", "TrainedModel", "Trainer", "TrainingTimeout"]
