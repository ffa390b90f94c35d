"""An MLflow model registry (SQLite) for tests that need versions and aliases but no
trained model: versions registered from empty runs, in milliseconds instead of a
training each.

Creating the store's schema takes seconds, so the session shares one; tests keep
apart by model name (``registry_model``).
"""

from __future__ import annotations

import uuid

import pytest

from forge.training.versions import ModelVersions


@pytest.fixture(scope="session")
def registry_uri(serving_mlflow_uri: str) -> str:
    """The serving tests' store (tests/serving_fixtures.py): one schema to create."""
    return serving_mlflow_uri


@pytest.fixture
def registry_model() -> str:
    return f"m_{uuid.uuid4().hex[:10]}"


def register_versions(
    versions: ModelVersions, model: str, count: int, aliases: dict[str, int]
) -> None:
    """``count`` versions of ``model`` (1..count), each from an empty finished run with
    one metric, then ``aliases`` (alias -> version)."""
    client = versions.client
    experiment = client.create_experiment(f"forge/{model}")
    for number in range(1, count + 1):
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "val_accuracy", 0.5 + number / 100)
        client.set_terminated(run.info.run_id)
        tags = {"forge.request_id": f"train-{number}", "forge.task": "classifier"}
        versions.register(model, f"runs:/{run.info.run_id}/model", run.info.run_id, tags)
    for alias, number in aliases.items():
        versions.set_alias(model, alias, number)
