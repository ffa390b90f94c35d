"""The prediction engine on real Redis and a real MLflow store (SQLite): routing,
shadows, one model call per version per batch, per-call errors, the prediction log
and hot reload."""

from __future__ import annotations

import random
import threading
from typing import Any

import msgspec
import pytest
import redis

from forge.events import EVENT_FIELD, ModelVersion, PredictInput, encode
from forge.keys import Keys
from forge.observability.metrics import Metrics
from forge.serving.calls import PredictAnswer, PredictCall, PredictError
from forge.serving.engine import PredictionEngine
from forge.serving.routing import Route, RouteStore, Variant, choose
from forge.settings import Settings
from forge.training.promotion import promote
from forge.training.service import TrainingService
from forge.training.versions import CANDIDATE, CHAMPION
from tests.support.metrics import sample
from tests.support.serving import DIM, call, record_loads, train, vectors


def answers(results: list[PredictAnswer | PredictError]) -> list[PredictAnswer]:
    assert all(isinstance(r, PredictAnswer) for r in results), results
    return [r for r in results if isinstance(r, PredictAnswer)]


def two_versions(training: TrainingService, model: str) -> None:
    """Version 1 the champion, version 2 the candidate."""
    assert train(training, model) == 1
    assert train(training, model, promote="never") == 2


def routes(settings: Settings, client: redis.Redis) -> RouteStore:
    return RouteStore(client, Keys.from_settings(settings))


HALVES = Route(split=[Variant(ref=CHAMPION, weight=1), Variant(ref=CANDIDATE, weight=1)])


def rows_per_call(engine: PredictionEngine, model: str, version: int) -> list[int]:
    """The rows of each model call version ``version`` gets from now on."""
    catalog = engine.catalog
    loaded = catalog.pinned(catalog.state(model), str(version))
    real = loaded.model.predict
    calls: list[int] = []

    def counting(rows: Any) -> Any:
        calls.append(len(rows))
        return real(rows)

    loaded.model.predict = counting  # type: ignore[method-assign]
    return calls


def test_a_call_is_answered_by_the_champion_and_recorded(
    engine: PredictionEngine,
    training: TrainingService,
    model_name: str,
    redis_client: redis.Redis,
    serving_settings: Settings,
    serving_metrics: Metrics,
) -> None:
    train(training, model_name)
    (answer,) = answers(engine.predict([call(model_name, 3)]))
    assert (answer.model, answer.version, answer.variant) == (model_name, 1, CHAMPION)
    assert len(answer.predictions) == 3
    assert {p.label for p in answer.predictions} <= {"pos", "neg"}
    assert all(0 <= p.score <= 1 for p in answer.predictions)
    keys = Keys.from_settings(serving_settings)
    record = redis_client.hgetall(keys.prediction(answer.prediction_id))
    assert record[b"model"] == model_name.encode()
    assert msgspec.json.decode(record[b"1"]) == {
        "variant": CHAMPION,
        "labels": [p.label for p in answer.predictions],
        "shadow": False,
    }
    assert redis_client.ttl(keys.prediction(answer.prediction_id)) > 0
    assert redis_client.hget(keys.variant_stats(model_name, 1), "predictions") == b"3"
    metrics = serving_metrics
    assert sample(metrics, "forge_predictions_total", model=model_name, variant=CHAMPION) == 3
    latency = "forge_prediction_latency_seconds_count"
    assert sample(metrics, latency, model=model_name, variant=CHAMPION) == 1


def test_pinned_versions_bypass_the_split(
    engine: PredictionEngine,
    training: TrainingService,
    model_name: str,
    serving_settings: Settings,
    redis_client: redis.Redis,
) -> None:
    two_versions(training, model_name)
    routes(serving_settings, redis_client).put(model_name, HALVES)
    pins: list[str | int] = [2, "2", "002", CANDIDATE, CHAMPION, "latest", 1]
    results = answers(engine.predict([call(model_name, version=v, key="k") for v in pins]))
    assert [(r.version, r.variant) for r in results] == [
        (2, "2"),
        (2, "2"),
        (2, "2"),
        (2, CANDIDATE),
        (1, CHAMPION),
        (2, "latest"),
        (1, "1"),
    ]
    missing = engine.predict([call(model_name, version=9), call(model_name, version="nope")])
    assert [(e.status, str(e)) for e in missing if isinstance(e, PredictError)] == [
        (404, f"model {model_name!r} has no version 9"),
        (404, f"model {model_name!r} has no version 'nope'"),
    ]


def test_the_split_sends_each_key_to_the_variant_routing_chooses(
    engine: PredictionEngine,
    training: TrainingService,
    model_name: str,
    serving_settings: Settings,
    redis_client: redis.Redis,
) -> None:
    two_versions(training, model_name)
    routes(serving_settings, redis_client).put(model_name, HALVES)
    keys = [f"user-{i}" for i in range(24)]
    results = answers(engine.predict([call(model_name, key=k) for k in keys]))
    expected = [choose(HALVES, model_name, k, random.Random()) for k in keys]
    assert [r.variant for r in results] == expected
    assert {r.variant: r.version for r in results} == {CHAMPION: 1, CANDIDATE: 2}
    again = answers(engine.predict([call(model_name, key=k) for k in keys]))
    assert [r.variant for r in again] == expected  # sticky


def test_a_shadow_scores_in_the_same_model_call_and_is_recorded_never_returned(
    engine: PredictionEngine,
    training: TrainingService,
    model_name: str,
    serving_settings: Settings,
    redis_client: redis.Redis,
    serving_metrics: Metrics,
) -> None:
    two_versions(training, model_name)
    routes(serving_settings, redis_client).put(model_name, Route(shadow=CANDIDATE))
    champion, shadow = (rows_per_call(engine, model_name, n) for n in (1, 2))
    results = answers(engine.predict([call(model_name, 2), call(model_name, version=2)]))
    assert [(r.version, r.variant) for r in results] == [(1, CHAMPION), (2, "2")]
    assert (champion, shadow) == ([2], [3])
    keys = Keys.from_settings(serving_settings)
    shadowed = redis_client.hgetall(keys.prediction(results[0].prediction_id))
    assert msgspec.json.decode(shadowed[b"2"])["shadow"] is True
    assert msgspec.json.decode(shadowed[b"1"])["shadow"] is False
    pinned = redis_client.hgetall(keys.prediction(results[1].prediction_id))
    assert set(pinned) == {b"model", b"2"}  # a pinned call has no shadow
    metric = "forge_predictions_total"
    assert sample(serving_metrics, metric, model=model_name, variant="shadow:candidate") == 2


def test_one_model_call_per_version_for_a_whole_batch(
    engine: PredictionEngine, training: TrainingService, model_name: str
) -> None:
    two_versions(training, model_name)
    champion, pinned = (rows_per_call(engine, model_name, n) for n in (1, 2))
    batch = [call(model_name, 2), call(model_name, version=2), call(model_name, 5)]
    batch += [call(model_name, 1, version="2"), call(model_name, 3, key="k")]
    results = answers(engine.predict(batch))
    assert [len(r.predictions) for r in results] == [2, 1, 5, 1, 3]
    assert (champion, pinned) == ([10], [2])


def test_bad_inputs_fail_their_own_call_and_the_rest_are_answered(
    engine: PredictionEngine,
    training: TrainingService,
    model_name: str,
    serving_metrics: Metrics,
) -> None:
    train(training, model_name)
    good = call(model_name, 2)
    row = vectors(1)[0]
    bad = [
        [PredictInput(vector=[float("nan"), *row[1:]])],
        [PredictInput(vector=[1e39, *row[1:]])],
        [PredictInput(vector=row[:3])],
        [PredictInput(vector=row), PredictInput(vector=[*row, 1.0])],
        [PredictInput(text="a text for a model trained on vectors")],
        [PredictInput(vector=[])],
        [],
    ]
    batch = [good, *[PredictCall(model_name, inputs) for inputs in bad], call("no_such_model")]
    results = engine.predict(batch)
    assert isinstance(results[0], PredictAnswer)
    assert [(r.status if isinstance(r, PredictError) else 200) for r in results[1:]] == [
        *[422] * len(bad),
        404,
    ]
    messages = [str(r) for r in results[1:]]
    assert all("NaN" in m for m in messages[:2])
    assert messages[2] == "expected vectors of dimension 4, got shape (1, 3)"
    assert "mixed dimensions" in messages[3]
    assert "takes vectors, not texts" in messages[4]
    assert messages[-1] == "no model named 'no_such_model'"
    assert all("\n" not in m for m in messages)
    errors = "forge_prediction_errors_total"
    assert sample(serving_metrics, errors, model="", reason="not-found") == 1
    assert sample(serving_metrics, errors, model=model_name, reason="invalid-input") == len(bad)
    # Once a version's dimension is known, a wrong one is refused before any model call.
    wrong = engine.predict([PredictCall(model_name, [PredictInput(vector=row[:2])])])
    assert [str(e) for e in wrong] == ["expected vectors of dimension 4, got shape (1, 2)"]


def test_a_dropped_candidate_falls_back_to_the_champion(
    engine: PredictionEngine,
    training: TrainingService,
    model_name: str,
    serving_settings: Settings,
    redis_client: redis.Redis,
) -> None:
    two_versions(training, model_name)
    store = routes(serving_settings, redis_client)
    store.put(model_name, HALVES)
    keys = [f"user-{i}" for i in range(24)]
    assert {
        r.version for r in answers(engine.predict([call(model_name, key=k) for k in keys]))
    } == {1, 2}
    training.versions.drop_alias(model_name, CANDIDATE)
    store.bump()
    engine.refresh()
    results = answers(engine.predict([call(model_name, key=k) for k in keys]))
    assert {(r.variant, r.version) for r in results} == {(CHAMPION, 1)}


def test_a_model_without_a_champion_is_served_by_its_latest_version(
    engine: PredictionEngine, training: TrainingService, model_name: str
) -> None:
    train(training, model_name, promote="never")
    assert training.versions.aliases(model_name) == {CANDIDATE: 1}
    (answer,) = answers(engine.predict([call(model_name)]))
    assert (answer.version, answer.variant) == (1, CHAMPION)


def test_a_new_champion_is_loaded_by_refresh_before_routing_switches_to_it(
    engine: PredictionEngine,
    training: TrainingService,
    model_name: str,
    serving_settings: Settings,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    train(training, model_name)
    assert answers(engine.predict([call(model_name)]))[0].version == 1
    train(training, model_name, promote="never")
    loads = record_loads(training, monkeypatch)
    promote(training.versions, model_name, 2)
    routes(serving_settings, redis_client).bump()
    refresher = threading.Thread(target=engine.refresh, name="refresher")
    refresher.start()
    refresher.join()
    assert loads == [("refresher", "2")]
    assert answers(engine.predict([call(model_name)]))[0].version == 2
    assert len(loads) == 1  # the request found version 2 loaded


def test_versions_announced_on_the_stream_are_served_without_waiting_for_the_poll(
    serving_settings: Settings,
    redis_client: redis.Redis,
    training: TrainingService,
    model_name: str,
) -> None:
    slow_poll = serving_settings.replace(serve_registry_poll_s=3600.0)
    engine = PredictionEngine.from_settings(slow_poll, redis_client, training=training)
    ghost = engine.predict([call(model_name)])
    assert [e.status for e in ghost if isinstance(e, PredictError)] == [404]
    train(training, model_name, promote="never")
    engine.refresh()
    # Still unknown: nothing said a version came, and the poll is an hour away.
    assert isinstance(engine.predict([call(model_name)])[0], PredictError)
    keys = Keys.from_settings(slow_poll)
    announce(redis_client, keys, model_name, 1)
    engine.refresh()
    assert answers(engine.predict([call(model_name)]))[0].version == 1
    train(training, model_name, promote="never")  # no champion: the latest serves
    engine.refresh()
    assert answers(engine.predict([call(model_name)]))[0].version == 1
    announce(redis_client, keys, model_name, 2)
    engine.refresh()
    assert answers(engine.predict([call(model_name)]))[0].version == 2


def announce(client: redis.Redis, keys: Keys, model: str, version: int) -> None:
    event = ModelVersion(
        id=f"{model}:v{version}", model=model, model_version=version, run_id="r", source_id="s"
    )
    client.xadd(keys.model_versions, {EVENT_FIELD: encode(event)})


def test_vector_dimension_is_checked_against_the_model(
    engine: PredictionEngine, training: TrainingService, model_name: str
) -> None:
    train(training, model_name)
    rows = [PredictInput(vector=[0.5] * DIM), PredictInput(vector=[0.5] * DIM)]
    (answer,) = answers(engine.predict([PredictCall(model_name, rows)]))
    assert answer.predictions[0] == answer.predictions[1]


def test_pinned_versions_live_in_the_byte_bounded_model_cache(
    engine: PredictionEngine, training: TrainingService, model_name: str
) -> None:
    """The engine keeps no pinned model of its own: once the model cache lets one go
    (its byte budget), the next request that pins it loads it again, through the cache."""
    two_versions(training, model_name)
    pinned = PredictCall(model_name, [PredictInput(vector=[0.5] * DIM)], version=2)
    assert answers(engine.predict([pinned]))[0].version == 2
    cached = training.models.keys()
    key = next(k for k in cached if k.endswith(f":{model_name}:2"))
    assert training.models.evict(key)
    assert answers(engine.predict([pinned]))[0].version == 2
    assert key in training.models  # loaded again, and accounted again
