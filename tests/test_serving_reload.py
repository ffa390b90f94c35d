"""Hot reload under load: threads keep predicting over HTTP while the split changes, a
candidate is promoted and a new champion is trained. No request fails, every answer
comes from a variant that was routed to at that time, and every version is loaded by
the reload thread before routing switches to it (no request waits on a cold load)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from forge.events import EVENT_FIELD, ModelVersion, encode
from forge.keys import Keys
from forge.observability.metrics import Metrics
from forge.serving.app import create_app, services
from forge.serving.engine import PredictionEngine
from forge.serving.routing import Route, RouteStore, Variant
from forge.settings import Settings
from forge.training.promotion import promote
from forge.training.service import TrainingService
from forge.training.versions import CANDIDATE, CHAMPION
from tests.support.redis_helpers import wait_for
from tests.support.serving import record_loads, train, vectors

THREADS = 4


class Load:
    """Threads predicting with varied keys until stopped; every answer is kept."""

    def __init__(self, api: TestClient, model: str) -> None:
        self.api = api
        self.model = model
        self.answers: list[tuple[int, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(THREADS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
            assert not thread.is_alive()

    def _run(self, n: int) -> None:
        url = f"/v1/models/{self.model}/predict"
        i = 0
        while not self._stop.is_set():
            body = {"inputs": [{"vector": v} for v in vectors(1, seed=i)], "key": f"{n}-{i}"}
            response = self.api.post(url, json=body)
            with self._lock:
                self.answers.append((response.status_code, response.json()))
            i += 1

    def seen(self, variant: str, version: int) -> Callable[[], bool]:
        def found() -> bool:
            with self._lock:
                return any(
                    a.get("variant") == variant and a.get("version") == version
                    for _, a in self.answers
                )

        return found


@pytest.mark.slow
def test_routes_and_champions_change_under_load_without_a_failed_request(
    serving_settings: Settings,
    redis_client: redis.Redis,
    serving_metrics: Metrics,
    engine: PredictionEngine,
    training: TrainingService,
    model_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    train(training, model_name)
    train(training, model_name, promote="never")
    loads = record_loads(training, monkeypatch)
    routes = RouteStore(redis_client, Keys.from_settings(serving_settings))
    app = create_app(services(serving_settings, redis_client, serving_metrics, engine))
    with TestClient(app) as api, Load(api, model_name) as load_:
        wait_for(load_.seen(CHAMPION, 1))
        halves = [Variant(ref=CHAMPION, weight=1), Variant(ref=CANDIDATE, weight=1)]
        routes.put(model_name, Route(split=halves))
        wait_for(load_.seen(CANDIDATE, 2))
        promote(training.versions, model_name, 2)
        routes.put(
            model_name, Route(split=[Variant(ref=CHAMPION, weight=4), Variant(ref="1", weight=1)])
        )
        wait_for(load_.seen("1", 1))
        wait_for(load_.seen(CHAMPION, 2))
        assert train(training, model_name) == 3  # and made the champion
        routes.bump()
        wait_for(load_.seen(CHAMPION, 3))
    statuses = {status for status, _ in load_.answers}
    assert statuses == {200}, [a for s, a in load_.answers if s != 200][:3]
    routed = {(a["variant"], a["version"]) for _, a in load_.answers}
    assert routed <= {(CHAMPION, 1), (CANDIDATE, 2), (CHAMPION, 2), ("1", 1), (CHAMPION, 3)}
    first, *later = loads
    assert first == ("forge-predict_0", "1")
    assert {thread for thread, _ in later} == {"forge-serve-reload"}
    assert {ref for _, ref in later} >= {"2", "3"}


def test_a_server_follows_an_announced_change_without_waiting_for_its_interval(
    serving_settings: Settings,
    redis_client: redis.Redis,
    serving_metrics: Metrics,
    training: TrainingService,
    model_name: str,
) -> None:
    """With a reload interval of an hour, a route change (its epoch bump wakes the
    reload thread's blocking read) and a new version (its model-version event) are
    served all the same."""
    hourly = serving_settings.replace(serve_reload_interval_s=3600.0, serve_registry_poll_s=3600.0)
    train(training, model_name)
    train(training, model_name, promote="never")
    engine = PredictionEngine.from_settings(
        hourly, redis_client, serving_metrics.serving, training=training
    )
    routes = RouteStore(redis_client, Keys.from_settings(hourly))
    app = create_app(services(hourly, redis_client, serving_metrics, engine))
    with TestClient(app) as api, Load(api, model_name) as load_:
        wait_for(load_.seen(CHAMPION, 1))
        routes.put(model_name, Route(split=[Variant(ref=CANDIDATE, weight=1)]))
        wait_for(load_.seen(CANDIDATE, 2))
        routes.put(model_name, Route())
        assert train(training, model_name) == 3  # the champion, announced on its stream
        announce(redis_client, Keys.from_settings(hourly), model_name, 3)
        wait_for(load_.seen(CHAMPION, 3))
    assert {status for status, _ in load_.answers} == {200}


def announce(client: redis.Redis, keys: Keys, model: str, version: int) -> None:
    event = ModelVersion(
        id=f"{model}:v{version}", model=model, model_version=version, run_id="r", source_id="s"
    )
    client.xadd(keys.model_versions, {EVENT_FIELD: encode(event)})
