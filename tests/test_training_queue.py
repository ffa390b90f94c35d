"""The training queue in the runtime: priority lanes (high before normal before low,
with aging), and several trainings per worker (``FORGE_TRAINING_CONCURRENCY``)."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import replace

import msgspec
import pytest

from forge.events import EVENT_FIELD, Feedback, NewData, TrainingRequest
from forge.integrations.prefect import publish_and_wait
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, HandlerSpec, Message
from forge.runtime.priority import lane_order
from forge.runtime.worker import Worker
from tests.support.cli import run_cli
from tests.support.events import new_data, publish
from tests.support.redis_helpers import running, wait_for
from tests.support.workers import completions


def request(event_id: str, priority: str = "normal") -> dict[str, object]:
    return {
        "type": "training-request",
        "id": event_id,
        "model": "m",
        "task": "classifier",
        "collection": "c",
        "priority": priority,
    }


def trainer(ctx: Context, handle: object, concurrency: int = 1) -> Worker:
    registry = HandlerRegistry()
    spec = HandlerSpec(
        "training-requests",
        TrainingRequest,
        handle,  # type: ignore[arg-type]
        max_batch_size=1,
        concurrency=concurrency,
    )
    registry.register(spec)
    worker = Worker(ctx, registry)
    worker.ctx.broker.join_groups(worker.streams, ctx.consumer)
    return worker


def lane(ctx: Context, priority: str) -> str:
    return ctx.keys.lane(ctx.keys.training_requests, priority)  # type: ignore[arg-type]


def test_a_prioritized_stream_is_read_as_three_lanes(ctx: Context) -> None:
    worker = trainer(ctx, lambda messages: None)
    base = ctx.keys.training_requests
    assert worker.streams == [f"{base}:high", base, f"{base}:low"]
    assert ctx.keys.lane_of(f"{base}:low") == (base, "low")
    # One idempotency marker for every lane: an event id runs once, whatever its lane.
    assert ctx.keys.done(f"{base}:high", "e1") == ctx.keys.done(base, "e1")


def test_workers_take_high_before_normal_before_low(ctx: Context) -> None:
    seen: list[str] = []

    def handle(messages: Sequence[Message[TrainingRequest]]) -> None:
        seen.extend(m.event.id for m in messages)

    worker = trainer(ctx, handle)
    # Published lowest first: arrival order alone would run them the other way round.
    publish(ctx.redis, lane(ctx, "low"), request("low-1", "low"))
    publish(ctx.redis, lane(ctx, "normal"), request("normal-1"))
    publish(ctx.redis, lane(ctx, "high"), request("high-1", "high"))
    publish(ctx.redis, lane(ctx, "high"), request("high-2", "high"))
    while len(seen) < 4:
        worker.run_once()
    assert seen == ["high-1", "high-2", "normal-1", "low-1"]
    assert {c.source_stream for c in completions(ctx)} == {
        lane(ctx, "high"),
        lane(ctx, "normal"),
        lane(ctx, "low"),
    }


def test_a_low_request_runs_when_nothing_else_waits(ctx: Context) -> None:
    seen: list[str] = []
    worker = trainer(ctx, lambda messages: seen.extend(m.event.id for m in messages))
    publish(ctx.redis, lane(ctx, "low"), request("low-1", "low"))
    wait_for(lambda: worker.run_once() > 0 or bool(seen), timeout_s=10)
    assert seen == ["low-1"]


def test_a_low_request_that_waited_long_enough_goes_before_fresh_high_ones(ctx: Context) -> None:
    """Aging: an entry id from long ago (set explicitly, so no clock is raced) has waited
    far more than twice FORGE_PRIORITY_AGING_S, so it competes as high, and is older."""
    seen: list[str] = []
    worker = trainer(ctx, lambda messages: seen.extend(m.event.id for m in messages))
    publish(ctx.redis, lane(ctx, "high"), request("high-1", "high"))
    ctx.redis.xadd(lane(ctx, "low"), {"event": _encoded(request("old-low", "low"))}, id="1000-0")
    while len(seen) < 2:
        worker.run_once()
    assert seen == ["old-low", "high-1"]


def test_lane_order_raises_a_lane_one_level_per_aging_period() -> None:
    lanes = ["h", "n", "l"]
    now_s, aging_s = 10_000.0, 100.0
    # Fresh heads: by priority alone.
    assert lane_order(lanes, {"l": now_s, "n": now_s, "h": now_s}, now_s, aging_s) == lanes
    # Low waited one period: competes as normal, and is older than the normal head.
    heads = {"l": now_s - 150, "n": now_s - 10, "h": now_s - 1}
    assert lane_order(lanes, heads, now_s, aging_s) == ["h", "l", "n"]
    # Two periods: competes as high.
    heads = {"l": now_s - 250, "h": now_s - 1}
    assert lane_order(lanes, heads, now_s, aging_s) == ["l", "h"]
    # Empty lanes take no part.
    assert lane_order(lanes, {"l": now_s}, now_s, aging_s) == ["l"]


def test_concurrency_runs_that_many_trainings_at_once_and_reads_no_more(ctx: Context) -> None:
    gate = threading.Event()
    lock = threading.Lock()
    inside: list[str] = []
    most = 0

    def handle(messages: Sequence[Message[TrainingRequest]]) -> None:
        nonlocal most
        with lock:
            inside.extend(m.event.id for m in messages)
            most = max(most, len(inside))
        gate.wait(30)
        with lock:
            for m in messages:
                inside.remove(m.event.id)

    ctx = replace(ctx, settings=ctx.settings.replace(read_block_s=0.05))
    worker = trainer(ctx, handle, concurrency=2)
    for i in range(3):
        publish(ctx.redis, ctx.keys.training_requests, request(f"r{i}"))
    with running(worker):
        wait_for(lambda: len(inside) == 2, timeout_s=10)
        # Both slots are busy: the third request stays unread, for other workers.
        info = ctx.redis.xinfo_groups(ctx.keys.training_requests)[0]
        assert info["pending"] == 2
        assert info["lag"] == 1
        gate.set()
        wait_for(lambda: len(completions(ctx)) == 3, timeout_s=10)
    assert most == 2
    assert all(c.status == "succeeded" for c in completions(ctx))


def test_a_slot_whose_training_fails_hands_it_back_for_redelivery(ctx: Context) -> None:
    calls: list[int] = []

    def handle(messages: Sequence[Message[TrainingRequest]]) -> None:
        calls.append(messages[0].deliveries)
        if len(calls) == 1:
            raise RuntimeError("first delivery fails")

    ctx = replace(ctx, settings=ctx.settings.replace(read_block_s=0.05, redeliver_delay_s=0.01))
    worker = trainer(ctx, handle, concurrency=2)
    publish(ctx.redis, ctx.keys.training_requests, request("r1"))
    with running(worker):
        wait_for(lambda: len(completions(ctx)) == 1, timeout_s=10)
    assert calls == [1, 2]
    assert completions(ctx)[0].status == "succeeded"


def _encoded(event: dict[str, object]) -> bytes:
    return msgspec.json.encode(event)


# ---------------------------------------------------------------------- publishing


def test_forge_publish_routes_each_request_to_its_prioritys_lane(
    capsys: pytest.CaptureFixture[str], cli_env: Context
) -> None:
    events = [request("a", "high"), request("b"), request("c", "low"), request("d", "high")]
    code, out, _ = run_cli(capsys, "publish", "training-requests", json.dumps(events))
    assert code == 0
    assert len(out.split()) == 4

    def ids(priority: str) -> list[str]:
        entries = cli_env.redis.xrange(lane(cli_env, priority))
        return [json.loads(fields[EVENT_FIELD])["id"] for _, fields in entries]

    assert (ids("high"), ids("normal"), ids("low")) == (["a", "d"], ["b"], ["c"])
    # A lane is accepted as the stream's name too; the event's priority still routes it.
    code, _, _ = run_cli(capsys, "publish", "training-requests:high", json.dumps(request("e")))
    assert code == 0
    assert ids("normal") == ["b", "e"]


def test_publish_and_wait_sends_a_high_priority_request_to_the_high_lane(ctx: Context) -> None:
    worker = trainer(ctx, lambda messages: None)
    with running(worker):
        completion = publish_and_wait(
            "m", "classifier", "c", timeout_s=10, settings=ctx.settings, priority="high"
        )
    assert completion.status == "succeeded"
    assert completion.source_stream == lane(ctx, "high")
    assert ctx.redis.xlen(ctx.keys.training_requests) == 0


def test_batches_read_together_are_all_leased_while_the_first_runs(ctx: Context) -> None:
    """One XREADGROUP can hand over batches of several streams; the later ones must not
    sit unleased (and be reclaimed) while an hour-long first one runs."""
    held: list[dict[str, list[str]]] = []
    registry = HandlerRegistry()
    registry.register(HandlerSpec("new-data", NewData, lambda ms: held.append(worker.lease.held())))
    registry.register(HandlerSpec("feedback", Feedback, lambda ms: None))
    worker = Worker(ctx, registry)
    worker.ctx.broker.join_groups(worker.streams, ctx.consumer)
    publish(ctx.redis, ctx.keys.new_data, new_data("n1"))
    feedback = publish(
        ctx.redis,
        ctx.keys.feedback,
        {"type": "feedback", "id": "f1", "prediction_id": "p1", "label": "x"},
    )
    worker.run_once()
    assert held == [
        {ctx.keys.new_data: [held[0][ctx.keys.new_data][0]], ctx.keys.feedback: [feedback]}
    ]
    assert worker.lease.held() == {}
