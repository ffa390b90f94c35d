"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis):
whatever a client sends, the server answers without a 5xx, with a status the document
lists, a content type it lists, and a body its schema for that status describes.

Each operation's cases come from ``APIOperation.as_strategy`` under hypothesis (rather
than ``schema.parametrize``, whose fixture-loaded form does not work with this pytest),
derandomized: the same cases on every run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi

from forge.observability.metrics import Metrics
from forge.serving.app import create_app, services
from forge.serving.engine import PredictionEngine
from forge.settings import Settings
from forge.training.service import TrainingService
from tests.support.serving import train

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
OPERATIONS = [
    ("POST", "/v1/models/{model}/predict"),
    ("POST", "/v1/collections/{collection}/search"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("GET", "/health"),
    ("GET", "/metrics"),
]
# Operations that take a body get invalid bodies too (path parameters are any string:
# there is no invalid one to make).
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"
]
EXAMPLES = 40


@pytest.fixture
def api_schema(
    serving_settings: Settings,
    redis_client: redis.Redis,
    serving_metrics: Metrics,
    engine: PredictionEngine,
    training: TrainingService,
    model_name: str,
    pg_url: str,
) -> Iterator[schemathesis.BaseSchema]:
    train(training, model_name)
    settings = serving_settings.replace(postgres_url=pg_url)
    app = create_app(services(settings, redis_client, serving_metrics, engine))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    asgi.shutdown_lifespans()  # the app's batcher and reload thread


@pytest.mark.postgres
def test_every_operation_is_fuzzed(api_schema: schemathesis.BaseSchema) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.postgres
@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_the_api_answers_anything_within_its_document(
    api_schema: schemathesis.BaseSchema,
    model_name: str,
    method: str,
    path: str,
    mode: GenerationMode,
) -> None:
    operation = api_schema[path][method]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def answers_within_the_document(case: Case) -> None:
        if case.path_parameters and "model" in case.path_parameters and len(str(case.body)) % 2:
            # Half the model cases name a model that exists, so that bodies are checked
            # all the way through the engine, not only up to the unknown model.
            case.path_parameters["model"] = model_name
        case.call_and_validate(checks=CHECKS)

    answers_within_the_document()
