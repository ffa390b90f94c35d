"""Training tasks: pure ML over a collection's vectors, no Redis or MLflow.

``forge.training.registry`` maps a training request's ``task`` to its ``Trainer``
(importing it loads torch and scikit-learn); the types here are cheap to import.
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
