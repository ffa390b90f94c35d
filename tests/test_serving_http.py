"""The HTTP API through Starlette's TestClient: predictions, models, search, auth, and
hostile requests, which all end in a one-line 4xx."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import jsonschema
import msgspec
import pytest
import redis
from fastapi.testclient import TestClient

from forge.embedding.model import Embedder
from forge.keys import Keys
from forge.observability.metrics import Metrics
from forge.serving.api_types import PredictBody, ref, schema_components
from forge.serving.app import create_app, services
from forge.serving.engine import PredictionEngine
from forge.serving.routing import Route, RouteStore, Variant, choose
from forge.settings import Settings
from forge.training.base import Dataset
from forge.training.service import TrainingService
from forge.training.versions import CANDIDATE, CHAMPION
from forge.vectorstore import Row, VectorStore
from tests.support.serving import DIM, PARAMS, train, vectors

TOKEN = "s3cret-token"


def make_client(
    settings: Settings, client: redis.Redis, metrics: Metrics, engine: PredictionEngine
) -> TestClient:
    return TestClient(create_app(services(settings, client, metrics, engine)))


@pytest.fixture
def api(
    serving_settings: Settings,
    redis_client: redis.Redis,
    serving_metrics: Metrics,
    engine: PredictionEngine,
) -> Iterator[TestClient]:
    with make_client(serving_settings, redis_client, serving_metrics, engine) as client:
        yield client


@pytest.fixture
def trained(training: TrainingService, model_name: str) -> str:
    """A model with a champion (version 1) and a candidate (version 2)."""
    train(training, model_name)
    train(training, model_name, promote="never")
    return model_name


def body(n: int = 1, **fields: Any) -> dict[str, Any]:
    return {"inputs": [{"vector": v} for v in vectors(n)], **fields}


def assert_one_line_error(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.content.count(b"\n") == 1
    assert response.content.endswith(b"\n")
    decoded = json.loads(response.content)
    assert list(decoded) == ["error"]
    assert "Traceback" not in decoded["error"]
    return str(decoded["error"])


# ---------------------------------------------------------------------- predictions


def test_predict_round_trip(api: TestClient, trained: str) -> None:
    response = api.post(f"/v1/models/{trained}/predict", json=body(3))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert list(answer) == ["id", "model", "version", "variant", "predictions"]
    assert (answer["model"], answer["version"], answer["variant"]) == (trained, 1, CHAMPION)
    assert len(answer["id"]) == 32
    assert [set(p) for p in answer["predictions"]] == [{"label", "score"}] * 3
    assert {p["label"] for p in answer["predictions"]} <= {"pos", "neg"}


@pytest.mark.parametrize(
    ("version", "expected"), [(2, (2, "2")), ("2", (2, "2")), (CANDIDATE, (2, CANDIDATE))]
)
def test_a_pinned_version_answers(
    api: TestClient, trained: str, version: Any, expected: tuple[int, str]
) -> None:
    response = api.post(f"/v1/models/{trained}/predict", json=body(version=version))
    answer = response.json()
    assert (answer["version"], answer["variant"]) == expected


def test_the_split_is_honoured_per_key_and_shadows_stay_hidden(
    api: TestClient,
    trained: str,
    serving_settings: Settings,
    redis_client: redis.Redis,
    engine: PredictionEngine,
) -> None:
    route = Route(
        split=[Variant(ref=CHAMPION, weight=3), Variant(ref=CANDIDATE, weight=1)], shadow="1"
    )
    keys = Keys.from_settings(serving_settings)
    RouteStore(redis_client, keys).put(trained, route)
    engine.refresh()
    seen = set()
    for i in range(16):
        key = f"user-{i}"
        answer = api.post(f"/v1/models/{trained}/predict", json=body(key=key)).json()
        assert answer["variant"] == choose(route, trained, key, random.Random())
        assert answer["version"] == {CHAMPION: 1, CANDIDATE: 2}[answer["variant"]]
        record = redis_client.hgetall(keys.prediction(answer["id"]))
        if answer["version"] == 2:  # the shadow, version 1, scored it too
            assert msgspec.json.decode(record[b"1"])["shadow"] is True
        seen.add(answer["variant"])
    assert seen == {CHAMPION, CANDIDATE}


def test_texts_are_embedded_with_the_versions_embedding_model(
    api: TestClient,
    training: TrainingService,
    model_name: str,
    embedder: Embedder,
    engine: PredictionEngine,
) -> None:
    texts = [f"I want a refund for order {i}" for i in range(15)]
    texts += [f"I cannot log in to account {i}" for i in range(15)]
    data = Dataset(
        [f"t{i}" for i in range(30)],
        embedder.encode(texts, 32),
        [{"y": "billing"}] * 15 + [{"y": "login"}] * 15,
    )
    params = {**PARAMS, "epochs": 20, "hidden_dim": 32}
    train(training, model_name, data=data, embedding_model=embedder.name, params=params)
    engine.embedding.models.get_or_load(f"embedder:{embedder.name}", lambda: embedder, lambda _: 1)
    inputs = [{"text": "please refund my money"}, {"text": "my login fails"}]
    response = api.post(f"/v1/models/{model_name}/predict", json={"inputs": inputs})
    assert [p["label"] for p in response.json()["predictions"]] == ["billing", "login"]
    mixed = {"inputs": [{"text": "refund"}, {"vector": [0.1] * DIM}]}
    error = assert_one_line_error(api.post(f"/v1/models/{model_name}/predict", json=mixed), 422)
    assert "mixed dimensions" in error


# ---------------------------------------------------------------------- models


def test_models_list_and_show_versions_aliases_metrics_split_and_shadow(
    api: TestClient, trained: str, serving_settings: Settings, redis_client: redis.Redis
) -> None:
    route = Route(
        split=[Variant(ref=CHAMPION, weight=9), Variant(ref="2", weight=1)], shadow=CANDIDATE
    )
    RouteStore(redis_client, Keys.from_settings(serving_settings)).put(trained, route)
    api.post(f"/v1/models/{trained}/predict", json=body(2, version=1))
    listed = api.get("/v1/models").json()["models"]
    (summary,) = [m for m in listed if m["name"] == trained]
    assert summary["latest"] == 2
    assert summary["aliases"] == {CHAMPION: 1, CANDIDATE: 2}
    assert summary["route"]["split"] == [{"ref": CHAMPION, "weight": 9}, {"ref": "2", "weight": 1}]
    assert summary["route"]["shadow"] == CANDIDATE
    shown = api.get(f"/v1/models/{trained}").json()
    assert [v["version"] for v in shown["versions"]] == [2, 1]
    assert shown["versions"][1]["aliases"] == [CHAMPION]
    assert "val_macro_f1" in shown["versions"][1]["metrics"]
    assert shown["versions"][1]["online"]["predictions"] == 2
    assert shown["versions"][1]["task"] == "classifier"
    assert assert_one_line_error(api.get("/v1/models/nope"), 404) == "no model named 'nope'"


def test_health_metrics_and_openapi(api: TestClient, trained: str) -> None:
    assert api.get("/health").json() == {"status": "ok", "checks": {"redis": "ok", "reload": "ok"}}
    api.post(f"/v1/models/{trained}/predict", json=body(2))
    metrics = api.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    line = f'forge_predictions_total{{model="{trained}",variant="champion"}} 2.0'
    assert line in metrics.text.splitlines()
    document = api.get("/openapi.json").json()
    assert set(document["paths"]) == {
        "/v1/models/{model}/predict",
        "/v1/collections/{collection}/search",
        "/v1/models",
        "/v1/models/{model}",
        "/health",
        "/metrics",
    }
    assert "HTTPValidationError" not in document["components"]["schemas"]
    predict = document["paths"]["/v1/models/{model}/predict"]["post"]
    schema = predict["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/PredictBody"}


# ---------------------------------------------------------------------- hostile input


NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"{", 400),
        (b"", 400),
        (b"\xff\xfe", 400),
        (NESTED, 422),
        (b'{"inputs": [{"vector": [NaN, 1, 2, 3]}]}', 400),
        (b'{"inputs": "everything"}', 422),
        (b'{"inputs": []}', 422),
        (b'{"inputs": [{}]}', 422),
        (b'{"inputs": [{"vector": [1, 2, 3, 4], "text": "both"}]}', 422),
        (b'{"inputs": [{"vector": ["a", 2, 3, 4]}]}', 422),
        (b'{"inputs": [{"vector": [1e400, 2, 3, 4]}]}', 422),
        (b'{"inputs": [{"vector": [1e39, 2, 3, 4]}]}', 422),
        (b'{"inputs": [{"vector": [1, 2, 3]}]}', 422),
        (b'{"inputs": [{"vector": []}]}', 422),
        (b'{"inputs": [{"vector": [1, 2, 3, 4]}], "version": 0}', 422),
        (b'{"inputs": [{"vector": [1, 2, 3, 4]}], "version": true}', 422),
        (b'{"inputs": [{"vector": [1, 2, 3, 4]}], "version": "nope"}', 404),
        (b'{"inputs": [{"vector": [1, 2, 3, 4]}], "key": "' + b"k" * 300 + b'"}', 422),
        (b'{"inputs": [{"text": "a model trained on vectors"}]}', 422),
        (b"[1, 2]", 422),
    ],
)
def test_hostile_bodies_get_one_line_4xx(
    api: TestClient, trained: str, payload: bytes, status: int
) -> None:
    response = api.post(f"/v1/models/{trained}/predict", content=payload)
    assert_one_line_error(response, status)


def test_unknown_models_routes_methods_and_oversized_bodies(
    api: TestClient, trained: str, serving_settings: Settings
) -> None:
    assert_one_line_error(api.post("/v1/models/nope/predict", json=body()), 404)
    assert_one_line_error(api.post("/v1/models/no%2Fpe/predict", json=body()), 404)
    assert_one_line_error(api.get("/v1/nothing"), 404)
    assert_one_line_error(api.delete(f"/v1/models/{trained}"), 405)
    limit = serving_settings.serve_max_body_bytes
    huge = b'{"inputs": [{"vector": [' + b"1," * limit + b"1]}]}"
    url = f"/v1/models/{trained}/predict"
    assert_one_line_error(api.post(url, content=huge), 413)

    def streamed() -> Iterator[bytes]:  # no Content-Length: the bytes are counted
        yield b'{"inputs": [{"vector": ['
        for _ in range(limit // 4096 + 1):
            yield b"1," * 2048
        yield b"1]}]}"

    assert_one_line_error(api.post(url, content=streamed()), 413)
    lying = {"content-length": "abc"}
    assert_one_line_error(api.post(url, content=b"{}", headers=lying), 400)


# ---------------------------------------------------------------------- auth


def test_a_token_guards_everything_but_health(
    serving_settings: Settings,
    redis_client: redis.Redis,
    serving_metrics: Metrics,
    engine: PredictionEngine,
    trained: str,
) -> None:
    guarded = serving_settings.replace(api_token=TOKEN)
    with make_client(guarded, redis_client, serving_metrics, engine) as api:
        url = f"/v1/models/{trained}/predict"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = api.post(url, json=body(), headers=headers)
            assert_one_line_error(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"
        assert_one_line_error(api.get("/metrics"), 401)
        assert_one_line_error(api.get("/openapi.json"), 401)
        assert api.get("/health").status_code == 200
        ok = api.post(url, json=body(), headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        document = api.get("/openapi.json", headers={"Authorization": f"bearer {TOKEN}"})
        assert document.json()["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


# ---------------------------------------------------------------------- search


@pytest.mark.postgres
def test_search_finds_the_nearest_records(
    serving_settings: Settings,
    redis_client: redis.Redis,
    serving_metrics: Metrics,
    engine: PredictionEngine,
    pg_url: str,
    vector_store: VectorStore,
    collection_name: str,
    embedder: Embedder,
) -> None:
    texts = ["the cat sat on the mat", "stock markets fell sharply", "a kitten naps in the sun"]
    topics = ["pets", "finance", "pets"]
    encoded = embedder.encode(texts, 8)
    rows = [
        Row(f"d{i}", encoded[i], "load", text=texts[i], metadata={"topic": topics[i]})
        for i in range(3)
    ]
    vector_store.write_batch(collection_name, rows, ["load"], "test:search", model=embedder.name)
    engine.embedding.models.get_or_load(f"embedder:{embedder.name}", lambda: embedder, lambda _: 1)
    settings = serving_settings.replace(postgres_url=pg_url)
    with make_client(settings, redis_client, serving_metrics, engine) as api:
        url = f"/v1/collections/{collection_name}/search"
        found = api.post(url, json={"text": "cats and kittens", "k": 2}).json()["results"]
        assert sorted(r["id"] for r in found) == ["d0", "d2"]
        assert found[0]["metadata"] == {"topic": "pets"}
        assert found[0]["text"] in texts
        assert list(found[0]) == ["id", "score", "text", "metadata"]
        only = api.post(url, json={"text": "cats", "filter": {"topic": "finance"}})
        only = only.json()["results"]
        assert [r["id"] for r in only] == ["d1"]
        missing = api.post("/v1/collections/nope/search", json={"text": "x"})
        assert assert_one_line_error(missing, 404) == "no collection 'nope'"
        assert_one_line_error(api.post(url, json={"text": "x", "k": 0}), 422)
        assert_one_line_error(api.post("/v1/collections/1bad/search", json={"text": "x"}), 404)


PREDICT_BODIES = [
    {"inputs": [{"vector": [1.0]}]},
    {"inputs": [{"text": "x"}]},
    {"inputs": [{"vector": [1.0], "text": None}]},
    {"inputs": [{"vector": None, "text": "x"}]},
    {"inputs": [{"vector": None}]},
    {"inputs": [{"vector": [1.0], "text": "x"}]},
    {"inputs": [{}]},
    {"inputs": []},
    {"inputs": [{"vector": [1.0]}], "version": 0},
    {"inputs": [{"vector": [1.0]}], "version": "3"},
    {"inputs": [{"vector": [1.0]}], "version": ""},
    {"inputs": [{"vector": [1.0]}], "key": None},
]


@pytest.mark.parametrize("candidate", PREDICT_BODIES)
def test_the_documented_predict_body_accepts_exactly_what_the_server_decodes(
    candidate: dict[str, Any],
) -> None:
    components = schema_components()
    document = {**ref(PredictBody), "components": {"schemas": components}}
    documented = jsonschema.Draft202012Validator(document).is_valid(candidate)
    try:
        msgspec.json.decode(msgspec.json.encode(candidate), type=PredictBody)
    except msgspec.ValidationError:
        decoded = False
    else:
        decoded = True
    assert documented == decoded


def test_the_documented_route_answers_as_the_fast_path_does(
    serving_settings: Settings,
    redis_client: redis.Redis,
    serving_metrics: Metrics,
    engine: PredictionEngine,
    trained: str,
) -> None:
    """Predictions are answered in front of FastAPI; the route FastAPI documents
    answers the same when reached (an app without the fast path in front)."""
    outer = create_app(services(serving_settings, redis_client, serving_metrics, engine))
    url = f"/v1/models/{trained}/predict"
    payloads = [msgspec.json.encode(body(2, version=2)), b"{", b'{"inputs": []}', b"x" * 2**21]
    answers = {}
    for app in (outer, outer.app):
        with TestClient(app) as api:
            answers[app] = [api.post(url, content=p) for p in payloads]
    fast, documented = answers[outer], answers[outer.app]
    assert (
        [r.status_code for r in fast] == [r.status_code for r in documented] == [200, 400, 422, 413]
    )
    assert [r.json()["version"] for r in (fast[0], documented[0])] == [2, 2]
    assert [r.content for r in fast[1:]] == [r.content for r in documented[1:]]
