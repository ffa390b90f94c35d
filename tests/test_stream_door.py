"""The stream door: predict-requests answered on forge:predictions through the runtime,
with Forge's real handler registration and engine (tiny classifiers in a real MLflow
registry), and feedback on those predictions promoting a candidate end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from consumers import register
from consumers.once import Once
from consumers.predict import PredictHandler
from forge.errors import TransientError
from forge.events import EVENT_FIELD, Label, ModelVersion, Prediction, PredictRequest, decode_as
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, Message, Succeeded
from forge.runtime.worker import Worker
from forge.serving.autopromote import REASON
from forge.serving.calls import FAILED, PredictError
from forge.serving.engine import PredictAnswer, PredictCall
from forge.serving.experiment import enroll
from forge.serving.routing import RouteStore
from forge.settings import Settings
from forge.training.service import TrainingService
from forge.training.versions import CANDIDATE, CHAMPION, ModelVersions
from tests.support.events import publish
from tests.support.redis_helpers import running, wait_for
from tests.support.serving import DIM, dataset, train, vectors
from tests.support.workers import completions, dead_letters

REPO = Path(__file__).resolve().parents[1]
MIN_FEEDBACK = 20
# Enough to learn the sign of the first value (the tiny models' label) well.
LEARNT = {"label_field": "y", "hidden_dim": 16, "epochs": 40}


@pytest.fixture
def settings(settings: Settings, registry_uri: str) -> Settings:
    return settings.replace(
        mlflow_tracking_uri=registry_uri,
        serve_reload_interval_s=0.05,
        serve_registry_poll_s=0.05,
        compare_min_feedback=MIN_FEEDBACK,
    )


@pytest.fixture
def service(settings: Settings) -> TrainingService:
    return TrainingService.from_settings(settings)


@pytest.fixture
def door(ctx: Context) -> Iterator[Worker]:
    """A worker with Forge's registration, reading predict-requests and feedback."""
    registry = HandlerRegistry()
    register(registry, ctx)
    worker = Worker(ctx, registry, streams=["predict-requests", "feedback"])
    worker.ctx.broker.ensure_groups(worker.streams)
    with running(worker):
        yield worker


def request(event_id: str, model: str, rows: list[list[float]], **fields: Any) -> dict[str, Any]:
    inputs = [{"vector": row} for row in rows]
    return {"type": "predict-request", "id": event_id, "model": model, "inputs": inputs, **fields}


def predictions(ctx: Context) -> list[Prediction]:
    entries = ctx.redis.xrange(ctx.keys.predictions)
    return [decode_as(Prediction, fields[EVENT_FIELD]) for _, fields in entries]


def done(ctx: Context, n: int) -> dict[str | None, Any]:
    wait_for(lambda: len(completions(ctx)) >= n)
    return {c.source_id: c for c in completions(ctx)}


def test_each_request_gets_one_prediction_and_bad_ones_say_why(
    ctx: Context, service: TrainingService, registry_model: str, door: Worker
) -> None:
    model = registry_model
    assert train(service, model) == 1
    rows = vectors(3)
    events = [
        request("r1", model, rows[:2]),
        request("r2", model, rows[2:], key="customer-7"),
        request("r3", model, rows[:1], model_version=1),
        request("r4", "no_such_model", rows[:1]),
        request("r5", model, [[0.1, 0.2, 0.3]]),  # 3 values for a 4-d model
        {**request("r6", model, []), "inputs": [{"vector": rows[0], "text": "both"}]},
    ]
    for event in events:
        publish(ctx.redis, ctx.keys.predict_requests, event)
    finished = done(ctx, len(events))
    publish(ctx.redis, ctx.keys.predict_requests, events[0])  # the same request again
    finished = done(ctx, len(events) + 1)

    answers = {p.source_id: p for p in predictions(ctx)}
    assert [p.source_id for p in predictions(ctx)].count("r1") == 1
    assert set(answers) == {"r1", "r2", "r3"}
    for source_id, n_rows in (("r1", 2), ("r2", 1), ("r3", 1)):
        answer = answers[source_id]
        assert (answer.id, answer.model, answer.model_version) == (source_id, model, 1)
        assert len(answer.predictions) == n_rows
        assert {p.label for p in answer.predictions} <= {"pos", "neg"}
        assert finished[source_id].status == "succeeded"
        assert finished[source_id].result["predictions"] == n_rows
    assert answers["r1"].variant == answers["r2"].variant == CHAMPION
    assert answers["r3"].variant == "1"  # pinned
    assert ctx.redis.exists(ctx.keys.prediction("r1"))  # kept for feedback
    for source_id, reason in (("r4", "no_such_model"), ("r5", str(DIM))):
        failed = finished[source_id]
        assert (failed.status, failed.deliveries) == ("failed", 1)
        assert failed.error is not None
        assert reason in failed.error.message
    assert finished["r6"].status == "dead-lettered"
    (letter,) = dead_letters(ctx)
    assert letter.source_id == "r6"
    assert "exactly one of `vector` or `text`" in letter.error.message


def test_feedback_on_stream_predictions_promotes_a_candidate_that_wins(
    ctx: Context,
    service: TrainingService,
    registry_model: str,
    door: Worker,
) -> None:
    model = registry_model
    # The champion learnt the labels backwards; the candidate learnt them right.
    right, flipped = dataset(400), dataset(400)
    flipped.metadata[:] = [{"y": "neg" if m["y"] == "pos" else "pos"} for m in flipped.metadata]
    assert train(service, model, data=flipped, params=LEARNT) == 1
    assert train(service, model, data=right, params=LEARNT, promote="on-significance") == 2
    versions: ModelVersions = service.versions
    assert versions.aliases(model) == {CHAMPION: 1, CANDIDATE: 2}
    enroll(RouteStore(ctx.redis, ctx.keys), model, shadow_candidate=True)  # as training does

    rows = vectors(4 * MIN_FEEDBACK, seed=3)
    for i, row in enumerate(rows):
        publish(ctx.redis, ctx.keys.predict_requests, request(f"p{i}", model, [row]))
    done(ctx, len(rows))
    assert {p.model_version for p in predictions(ctx)} == {1}  # the shadow is never seen
    # Feedback wherever the two disagree: the candidate's answer is the true label.
    sent = 0
    for i in range(len(rows)):
        record = ctx.redis.hgetall(ctx.keys.prediction(f"p{i}"))
        champion, candidate = (decode_as_labels(record[str(v).encode()]) for v in (1, 2))
        if champion != candidate:
            event = {"type": "feedback", "id": f"f{i}", "prediction_id": f"p{i}"}
            publish(ctx.redis, ctx.keys.feedback, {**event, "label": candidate[0]})
            sent += 1
    assert sent >= MIN_FEEDBACK
    done(ctx, len(rows) + sent)

    assert versions.aliases(model) == {CHAMPION: 2}
    (announced,) = [
        decode_as(ModelVersion, f[EVENT_FIELD])
        for _, f in ctx.redis.xrange(ctx.keys.model_versions)
    ]
    assert (announced.model_version, announced.reason) == (2, REASON)
    assert announced.evidence["candidate"]["correct"] == announced.evidence["candidate"]["feedback"]
    assert announced.evidence["champion"]["correct"] == 0
    # The door follows the new champion.
    publish(ctx.redis, ctx.keys.predict_requests, request("after", model, rows[:1]))
    done(ctx, len(rows) + sent + 1)
    (after,) = [p for p in predictions(ctx) if p.source_id == "after"]
    assert (after.model_version, after.variant) == (2, CHAMPION)


def decode_as_labels(raw: bytes) -> list[str]:
    labels: list[str] = msgspec.json.decode(raw)["labels"]
    return labels


class _Engine:
    """Answers every call; counts refreshes."""

    def __init__(self) -> None:
        self.refreshes = 0
        self.calls: list[PredictCall] = []

    def refresh(self) -> None:
        self.refreshes += 1

    def predict(self, calls: list[PredictCall]) -> list[PredictAnswer]:
        self.calls += calls
        label = [Label(label="a", score=1.0)]
        return [PredictAnswer(c.prediction_id, c.model, 3, "candidate", label) for c in calls]


def test_the_handler_refreshes_the_engine_at_most_every_reload_interval(ctx: Context) -> None:
    engine, now = _Engine(), [100.0]
    handler = PredictHandler(ctx, Once(lambda: engine), clock=lambda: now[0])
    event = PredictRequest(id="r1", model="m", inputs=[], key="k", model_version="candidate")
    batch = [Message(event, ctx.keys.predict_requests, "1-0", 1)]
    interval = ctx.settings.serve_reload_interval_s
    for step in (0.0, interval / 2, interval * 0.99):
        now[0] = 100.0 + step
        handler(batch)
    assert engine.refreshes == 0  # a new engine has just read everything
    now[0] = 100.0 + interval
    (outcome,) = handler(batch)
    handler(batch)
    assert engine.refreshes == 1
    call = engine.calls[0]
    assert (call.prediction_id, call.key, call.version) == ("r1", "k", "candidate")
    assert isinstance(outcome, Succeeded)
    ((stream, published),) = outcome.publish
    assert stream == ctx.keys.predictions
    assert isinstance(published, Prediction)
    assert (published.id, published.source_id, published.model_version) == ("r1", "r1", 3)


def test_registering_the_handlers_loads_neither_torch_nor_mlflow(settings: Settings) -> None:
    code = f"""
import sys, redis
from consumers import register
from forge.observability.metrics import Metrics
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry
from forge.settings import Settings
settings = Settings(redis_url={settings.redis_url!r}, stream_prefix={settings.stream_prefix!r})
client = redis.Redis.from_url(settings.redis_url)
ctx = Context(settings=settings, redis=client, metrics=Metrics(gpu=False))
registry = HandlerRegistry()
register(registry, ctx)
print(" ".join(registry.streams))
print(" ".join(sorted({{"torch", "mlflow", "forge.serving.engine"}} & set(sys.modules))) or "-")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    streams, loaded = proc.stdout.splitlines()
    expected = {"new-data", "training-requests", "trials", "feedback", "predict-requests"}
    assert set(streams.split()) == expected
    assert loaded == "-"


class _UnavailableEngine(_Engine):
    def predict(self, calls: list[PredictCall]) -> list[PredictAnswer | PredictError]:  # type: ignore[override]
        return [PredictError("cannot load model 'm' now", FAILED) for _ in calls]


def test_a_model_that_cannot_be_loaded_is_retried_not_failed(ctx: Context) -> None:
    handler = PredictHandler(ctx, Once(_UnavailableEngine))
    event = PredictRequest(id="r1", model="m", inputs=[])
    with pytest.raises(TransientError, match="cannot load model"):
        handler([Message(event, ctx.keys.predict_requests, "1-0", 1)])
