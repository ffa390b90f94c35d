"""Fixtures of the serving tests: one MLflow store for the session, a model name per
test, and an engine over both. Registered in tests/conftest.py."""

from __future__ import annotations

import uuid

import pytest
import redis

from forge.observability.metrics import Metrics
from forge.serving.engine import PredictionEngine
from forge.settings import Settings
from forge.training.service import TrainingService
from forge.training.tracking import connect


@pytest.fixture(scope="session")
def serving_mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Creating a store's schema takes seconds: tests share one, apart by model name."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('serving-mlflow') / 'mlflow.db'}"
    connect(Settings(mlflow_tracking_uri=uri)).search_experiments()
    return uri


@pytest.fixture
def serving_settings(settings: Settings, serving_mlflow_uri: str) -> Settings:
    return settings.replace(
        mlflow_tracking_uri=serving_mlflow_uri,
        serve_reload_interval_s=0.05,
        serve_registry_poll_s=0.05,
    )


@pytest.fixture
def training(serving_settings: Settings) -> TrainingService:
    return TrainingService.from_settings(serving_settings)


@pytest.fixture
def model_name() -> str:
    return f"m_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def serving_metrics() -> Metrics:
    return Metrics(gpu=False)


@pytest.fixture
def engine(
    serving_settings: Settings,
    redis_client: redis.Redis,
    training: TrainingService,
    serving_metrics: Metrics,
) -> PredictionEngine:
    return PredictionEngine.from_settings(
        serving_settings, redis_client, serving_metrics.serving, training=training
    )
