"""Fixtures of the MLflow model tests (test_mlflow_models, test_models_upgrade): one
embedded store per test module, its training service, and scikit-learn's digits as a
collection of ready vectors. Modules with fixtures of these names keep their own."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from forge.settings import Settings
from forge.training.base import Dataset
from forge.training.service import TrainingService
from forge.training.tracking import connect


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("forge-home")
    settings = Settings(home_dir=home, mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    connect(settings).search_experiments()  # creates the schema once, for every test here
    return settings


@pytest.fixture(scope="module")
def service(store: Settings) -> TrainingService:
    return TrainingService.from_settings(store)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    data = load_digits()
    vectors = (data.data / 16.0).astype(np.float32)
    labels = [{"digit": int(d)} for d in data.target]
    return Dataset(ids=[f"d{i}" for i in range(len(vectors))], vectors=vectors, metadata=labels)
