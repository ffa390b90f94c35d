"""Feedback joined to predictions (real Redis), and automatic promotion on online
significance (real MLflow registry, versions from empty runs).

Predictions are written as the engine writes them (``PredictionLog``), so these tests
need no trained model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from consumers.feedback import FeedbackHandler
from consumers.once import Once
from consumers.training import TrainingHandler
from forge.events import EVENT_FIELD, Feedback, ModelVersion, TrainingRequest, decode_as
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, HandlerSpec, Message, Succeeded
from forge.runtime.worker import Worker
from forge.serving import autopromote
from forge.serving.autopromote import REASON, OnlinePromotion
from forge.serving.compare import TEST
from forge.serving.experiment import enroll
from forge.serving.records import PredictionLog, Served
from forge.serving.routing import Route, RouteStore, parse_split
from forge.settings import Settings
from forge.training.promotion import apply_policy
from forge.training.service import TrainingService
from forge.training.tracking import connect
from forge.training.versions import CANDIDATE, CHAMPION, ModelVersions
from tests.registry_fixtures import register_versions
from tests.support.events import publish
from tests.support.metrics import sample
from tests.support.redis_helpers import running, wait_for
from tests.support.workers import completions, dead_letters

MIN_FEEDBACK = 20


@pytest.fixture
def settings(settings: Settings, registry_uri: str) -> Settings:
    return settings.replace(mlflow_tracking_uri=registry_uri, compare_min_feedback=MIN_FEEDBACK)


@pytest.fixture
def versions(settings: Settings) -> ModelVersions:
    return ModelVersions(connect(settings))


@pytest.fixture
def handler(ctx: Context, versions: ModelVersions) -> FeedbackHandler:
    return FeedbackHandler(ctx, Once(lambda: versions))


def feedback_worker(ctx: Context, handler: FeedbackHandler) -> Worker:
    registry = HandlerRegistry()
    registry.register(HandlerSpec("feedback", Feedback, handler, name="feedback"))
    worker = Worker(ctx, registry)
    worker.ctx.broker.ensure_groups(worker.streams)
    return worker


def feedback(event_id: str, prediction_id: str, label: str, index: int = 0) -> dict[str, Any]:
    return {
        "type": "feedback",
        "id": event_id,
        "prediction_id": prediction_id,
        "index": index,
        "label": label,
    }


def stats(ctx: Context, model: str, version: int) -> dict[str, int]:
    raw = ctx.redis.hgetall(ctx.keys.variant_stats(model, version))
    return {k.decode(): int(v) for k, v in raw.items() if not k.startswith(b"latency:")}


def model_versions(ctx: Context) -> list[ModelVersion]:
    entries = ctx.redis.xrange(ctx.keys.model_versions)
    return [decode_as(ModelVersion, fields[EVENT_FIELD]) for _, fields in entries]


def shadowed(model: str, pid: str, champion: list[str], candidate: list[str]) -> list[Served]:
    """A prediction the champion (version 1) served and the candidate (2) shadowed."""
    return [
        Served(pid, model, 1, "champion", champion, 0.001),
        Served(pid, model, 2, "candidate", candidate, 0.003, shadow=True),
    ]


def messages(ctx: Context, events: Sequence[dict[str, Any]], deliveries: int = 1) -> list[Any]:
    return [
        Message(
            Feedback(**{k: v for k, v in e.items() if k != "type"}),
            ctx.keys.feedback,
            "1-0",
            deliveries,
        )
        for e in events
    ]


# ---------------------------------------------------------------------- the join


def test_feedback_counts_each_version_that_answered_once_per_row(
    ctx: Context, handler: FeedbackHandler
) -> None:
    model = "tickets"
    PredictionLog(ctx.redis, ctx.keys, 3600).record(shadowed(model, "p1", ["7", "3"], ["7", "4"]))
    events = [
        feedback("f1", "p1", "7", 0),  # both right
        feedback("f2", "p1", "4", 1),  # the shadow right, the champion wrong
        feedback("f3", "p1", "3", 0),  # row 0 again, under another id: not counted
        feedback("f4", "nope", "7"),
        feedback("f5", "p1", "7", 5),
    ]
    for event in events:
        publish(ctx.redis, ctx.keys.feedback, event)
    with running(feedback_worker(ctx, handler)):
        wait_for(lambda: len(completions(ctx)) >= len(events))
    done = {c.source_id: c for c in completions(ctx)}

    assert stats(ctx, model, 1) == {"predictions": 2, "feedback": 2, "correct": 1}
    assert stats(ctx, model, 2) == {"predictions": 2, "feedback": 2, "correct": 2}
    assert done["f1"].result == {"model": model, "counted": True, "correct": {"1": True, "2": True}}
    assert done["f2"].result["correct"] == {"1": False, "2": True}
    assert (done["f3"].status, done["f3"].result["counted"]) == ("succeeded", False)
    for event_id, reason in (("f4", "no prediction 'nope'"), ("f5", "index 5 is out of range")):
        assert (done[event_id].status, done[event_id].deliveries) == ("failed", 1)
        assert done[event_id].error is not None
        assert reason in done[event_id].error.message
    assert dead_letters(ctx) == []
    serving = {"model": model}
    assert sample(ctx.metrics, "forge_feedback_total", **serving, variant="champion") == 2
    assert sample(ctx.metrics, "forge_feedback_total", **serving, variant="shadow:candidate") == 2
    assert sample(ctx.metrics, "forge_online_accuracy", **serving, variant="champion") == 0.5
    assert (
        sample(ctx.metrics, "forge_online_accuracy", **serving, variant="shadow:candidate") == 1.0
    )


def test_a_retried_feedback_event_is_not_counted_twice(
    ctx: Context, handler: FeedbackHandler
) -> None:
    PredictionLog(ctx.redis, ctx.keys, 3600).record(shadowed("m", "p1", ["a"], ["b"]))
    (first,) = handler(messages(ctx, [feedback("f1", "p1", "b")]))
    # The worker died before its ack: the same event, delivered again.
    (again,) = handler(messages(ctx, [feedback("f1", "p1", "b")], deliveries=2))
    assert isinstance(first, Succeeded)
    assert isinstance(again, Succeeded)
    assert (
        first.result
        == again.result
        == {
            "model": "m",
            "counted": True,
            "correct": {"1": False, "2": True},
        }
    )
    assert stats(ctx, "m", 1)["feedback"] == stats(ctx, "m", 2)["feedback"] == 1


def test_feedback_past_the_window_fails_with_the_reason(
    ctx: Context, handler: FeedbackHandler
) -> None:
    PredictionLog(ctx.redis, ctx.keys, 3600).record(shadowed("m", "p1", ["a"], ["b"]))
    ctx.redis.delete(ctx.keys.prediction("p1"))  # what expiry does
    (outcome,) = handler(messages(ctx, [feedback("f1", "p1", "a")]))
    assert not isinstance(outcome, Succeeded)
    assert "older than the feedback window (kept 86400 s)" in outcome.error.message
    assert not ctx.redis.exists(ctx.keys.prediction("p1"))


# ---------------------------------------------------------------------- promotion


@pytest.fixture
def experiment(ctx: Context, versions: ModelVersions, registry_model: str) -> str:
    """A model whose candidate (2) shadows its champion (1) under on-significance."""
    register_versions(versions, registry_model, 2, {CHAMPION: 1, CANDIDATE: 2})
    route = enroll(RouteStore(ctx.redis, ctx.keys), registry_model, shadow_candidate=True)
    assert route == Route(shadow=CANDIDATE, policy="on-significance")
    return registry_model


def candidate_right(ctx: Context, model: str, n: int) -> list[dict[str, Any]]:
    """``n`` shadowed predictions the champion got wrong and the candidate right, and
    their feedback."""
    served = [s for i in range(n) for s in shadowed(model, f"p{i}", ["cat"], ["dog"])]
    PredictionLog(ctx.redis, ctx.keys, 3600).record(served)
    return [feedback(f"f{i}", f"p{i}", "dog") for i in range(n)]


def test_a_candidate_that_wins_online_is_promoted_once_by_concurrent_workers(
    ctx: Context, handler: FeedbackHandler, versions: ModelVersions, experiment: str
) -> None:
    model = experiment
    events = candidate_right(ctx, model, 3 * MIN_FEEDBACK)
    epoch = RouteStore(ctx.redis, ctx.keys).epoch()
    for event in events:
        publish(ctx.redis, ctx.keys.feedback, event)
    other = FeedbackHandler(ctx, Once(lambda: ModelVersions(connect(ctx.settings))))
    second = replace(ctx, consumer=f"{ctx.consumer}-2")
    with running(feedback_worker(ctx, handler)), running(feedback_worker(second, other)):
        wait_for(lambda: len(completions(ctx)) >= len(events))

    assert {c.status for c in completions(ctx)} == {"succeeded"}
    assert versions.aliases(model) == {CHAMPION: 2}
    assert RouteStore(ctx.redis, ctx.keys).epoch() > epoch
    (event,) = model_versions(ctx)
    assert (event.model, event.model_version, event.aliases) == (model, 2, [CHAMPION])
    assert (event.id, event.reason, event.source_id) == (f"{model}:v2:promoted", REASON, "train-2")
    evidence = event.evidence
    assert (evidence["test"], evidence["bound"]) == (TEST, "z >= 3.0")
    assert evidence["z"] >= 3.0
    assert evidence["champion"]["version"] == 1
    assert evidence["champion"]["correct"] == 0
    assert evidence["candidate"]["feedback"] == evidence["candidate"]["correct"] >= MIN_FEEDBACK
    assert evidence["feedback_id"] in {e["id"] for e in events}
    assert event.metrics == {"val_accuracy": pytest.approx(0.52)}


def test_a_promotion_interrupted_after_it_began_is_finished_and_announced_on_retry(
    ctx: Context,
    handler: FeedbackHandler,
    versions: ModelVersions,
    experiment: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = experiment
    batch = messages(ctx, candidate_right(ctx, model, MIN_FEEDBACK))
    real = autopromote.promote

    def fail_once(*args: Any) -> Any:
        monkeypatch.setattr(autopromote, "promote", real)
        raise ConnectionError("MLflow went away")

    monkeypatch.setattr(autopromote, "promote", fail_once)
    with pytest.raises(ConnectionError):
        handler(batch)
    assert versions.aliases(model) == {CHAMPION: 1, CANDIDATE: 2}
    outcomes = handler(batch)  # the runtime's retry of the batch
    published = [e for o in outcomes if isinstance(o, Succeeded) for _, e in o.publish]
    (event,) = published
    assert isinstance(event, ModelVersion)
    assert (event.model_version, event.reason) == (2, REASON)
    assert versions.aliases(model) == {CHAMPION: 2}
    assert stats(ctx, model, 2)["feedback"] == MIN_FEEDBACK  # counted once


def test_a_candidate_another_worker_is_promoting_is_left_to_it(
    ctx: Context, handler: FeedbackHandler, versions: ModelVersions, experiment: str
) -> None:
    model = experiment
    ctx.redis.set(ctx.keys.promotion(model, 2), "f-elsewhere")
    outcomes = handler(messages(ctx, candidate_right(ctx, model, MIN_FEEDBACK)))
    assert not [e for o in outcomes if isinstance(o, Succeeded) for e in o.publish]
    assert versions.aliases(model) == {CHAMPION: 1, CANDIDATE: 2}
    # The comparison itself says promote: only the lock held it back.
    promotion = OnlinePromotion(ctx.redis, ctx.keys, ctx.settings, lambda: versions)
    ctx.redis.delete(ctx.keys.promotion(model, 2))
    event = promotion.evaluate(model, "f-here")
    assert event is not None
    assert event.evidence["feedback_id"] == "f-here"
    assert versions.aliases(model) == {CHAMPION: 2}


def test_too_little_feedback_or_a_manual_policy_never_promotes(
    ctx: Context, handler: FeedbackHandler, versions: ModelVersions, experiment: str
) -> None:
    model = experiment
    events = candidate_right(ctx, model, 2 * MIN_FEEDBACK)
    handler(messages(ctx, events[: MIN_FEEDBACK - 1]))
    assert versions.aliases(model) == {CHAMPION: 1, CANDIDATE: 2}
    RouteStore(ctx.redis, ctx.keys).put(model, Route(shadow=CANDIDATE))  # policy manual
    outcomes = handler(messages(ctx, events[MIN_FEEDBACK - 1 :]))
    assert versions.aliases(model) == {CHAMPION: 1, CANDIDATE: 2}
    assert not [e for o in outcomes if isinstance(o, Succeeded) for e in o.publish]


def test_feedback_for_a_model_deleted_under_its_route_is_still_counted(
    ctx: Context, handler: FeedbackHandler, versions: ModelVersions, experiment: str
) -> None:
    model = experiment
    versions.client.delete_registered_model(model)
    outcomes = handler(messages(ctx, candidate_right(ctx, model, MIN_FEEDBACK)))
    assert {type(o) for o in outcomes} == {Succeeded}
    assert stats(ctx, model, 2)["feedback"] == MIN_FEEDBACK


# ---------------------------------------------------------------------- registration


def test_on_significance_registers_a_candidate_and_puts_the_route_under_the_policy(
    ctx: Context, versions: ModelVersions, registry_model: str
) -> None:
    register_versions(versions, registry_model, 2, {})
    first, second = versions.get(registry_model, 1), versions.get(registry_model, 2)
    # Nothing would serve a model without a champion: its first version is one.
    assert apply_policy(versions, first, "on-significance").aliases == [CHAMPION]
    assert apply_policy(versions, second, "on-significance").aliases == [CANDIDATE]
    routes = RouteStore(ctx.redis, ctx.keys)
    split = Route(split=parse_split(["champion=90", "candidate=10"]))
    routes.put("split-model", split)
    assert enroll(routes, "split-model", shadow_candidate=True) == Route(
        split=split.split, policy="on-significance"
    )
    assert enroll(routes, registry_model, shadow_candidate=False) == Route(policy="on-significance")


def test_a_training_request_under_on_significance_enrolls_the_models_route(
    ctx: Context, settings: Settings, versions: ModelVersions, registry_model: str
) -> None:
    """The training handler's part, on a request whose version is registered already
    (its answer comes from the registry: no data, no training)."""
    model = registry_model
    register_versions(versions, model, 2, {CHAMPION: 1})
    service = TrainingService.from_settings(settings)
    trainer = TrainingHandler(
        ctx, Once(lambda: pytest.fail("no data needed")), Once(lambda: service)
    )
    event = TrainingRequest(
        id="train-2", model=model, task="classifier", collection="c", promote="on-significance"
    )
    (outcome,) = trainer([Message(event, ctx.keys.training_requests, "1-0", 1)])
    assert isinstance(outcome, Succeeded)
    assert outcome.result["aliases"] == [CANDIDATE]
    assert versions.aliases(model) == {CHAMPION: 1, CANDIDATE: 2}
    assert RouteStore(ctx.redis, ctx.keys).get(model) == Route(
        shadow=CANDIDATE, policy="on-significance"
    )
