"""Fixtures of the tests that train through the real service (training, tuning,
distributed training): one MLflow store for the session, a model name per test, and
the registry's versions. Registered in tests/conftest.py; each test module layers its
own ``settings`` on top (the store, PostgreSQL, its own timings)."""

from __future__ import annotations

import uuid

import pytest

from forge.settings import Settings
from forge.training.tracking import connect
from forge.training.versions import ModelVersions


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the session: creating its schema takes seconds, so tests
    share it and keep apart by model name."""
    home = tmp_path_factory.mktemp("mlflow-home")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    connect(Settings(mlflow_tracking_uri=uri)).search_experiments()
    return uri


@pytest.fixture
def model() -> str:
    return f"m_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def versions(settings: Settings) -> ModelVersions:
    return ModelVersions(connect(settings))
