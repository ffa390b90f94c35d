"""The consumer-group runtime against a real Redis: batching, acks, retries, dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest
import redis

from forge.errors import InvalidEvent, PermanentError, TransientError
from forge.events import EVENT_FIELD, NewData
from forge.runtime.context import Context
from forge.runtime.handlers import (
    HandlerRegistry,
    HandlerSpec,
    Message,
    Outcome,
    Rejected,
    Succeeded,
)
from forge.runtime.worker import Worker
from tests.support.events import new_data, publish
from tests.support.gate import RefusingThenForwarding
from tests.support.metrics import sample
from tests.support.redis_helpers import TEST_REDIS_URL, running, wait_for
from tests.support.workers import completions, dead_letters, drain, make_worker, pending


def test_reads_in_batches_up_to_max_batch_size(ctx: Context) -> None:
    ctx = replace(ctx, settings=ctx.settings.replace(max_batch_size=4))
    sizes: list[int] = []

    def handle(messages: Sequence[Message[NewData]]) -> None:
        sizes.append(len(messages))

    worker = make_worker(ctx, handle)
    worker.ctx.broker.ensure_groups(worker.streams)
    for i in range(10):
        publish(ctx.redis, ctx.keys.new_data, new_data(f"e{i}"))
    drain(worker, ctx, 10)
    assert sizes == [4, 4, 2]
    assert all(c.status == "succeeded" for c in completions(ctx))
    assert pending(ctx) == 0


def test_a_handler_may_ask_for_larger_batches_than_max_batch_size(ctx: Context) -> None:
    ctx = replace(ctx, settings=ctx.settings.replace(max_batch_size=2))
    sizes: list[int] = []

    def handle(messages: Sequence[Message[NewData]]) -> None:
        sizes.append(len(messages))

    registry = HandlerRegistry()
    registry.register(HandlerSpec("new-data", NewData, handle, max_batch_size=6))
    worker = Worker(ctx, registry)
    for i in range(10):
        publish(ctx.redis, ctx.keys.new_data, new_data(f"e{i}"))
    drain(worker, ctx, 10)
    assert sizes == [6, 4]


def test_completion_describes_the_input_event(ctx: Context) -> None:
    def handle(messages: Sequence[Message[NewData]]) -> list[Outcome]:
        return [Succeeded({"records": len(m.event.records)}) for m in messages]

    entry_id = publish(ctx.redis, ctx.keys.new_data, new_data("e1", n=3))
    drain(make_worker(ctx, handle), ctx, 1)
    (done,) = completions(ctx)
    assert done.source_id == "e1"
    assert done.source_stream == ctx.keys.new_data
    assert done.source_entry_id == entry_id
    assert done.result == {"records": 3}
    assert done.worker == ctx.consumer
    assert done.timings.total_s >= done.timings.handler_s >= 0


def test_nothing_is_acked_before_the_handler_succeeds(ctx: Context) -> None:
    seen_pending: list[int] = []

    def handle(messages: Sequence[Message[NewData]]) -> None:
        seen_pending.append(pending(ctx))

    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    drain(make_worker(ctx, handle), ctx, 1)
    assert seen_pending == [1]
    assert pending(ctx) == 0


def test_transient_errors_are_retried_in_process(ctx: Context) -> None:
    calls: list[int] = []

    def handle(messages: Sequence[Message[NewData]]) -> None:
        calls.append(messages[0].deliveries)
        if len(calls) < 3:
            raise TransientError("database restarting")

    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    drain(make_worker(ctx, handle), ctx, 1)
    assert calls == [1, 1, 1]  # three attempts, one delivery
    assert completions(ctx)[0].status == "succeeded"
    retries = sample(ctx.metrics, "forge_retries_total", stream="new-data")
    assert retries == 2


def test_failing_entry_is_dead_lettered_after_exactly_three_deliveries(ctx: Context) -> None:
    deliveries: list[int] = []

    def handle(messages: Sequence[Message[NewData]]) -> None:
        deliveries.append(messages[0].deliveries)
        raise RuntimeError("model exploded")

    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    drain(make_worker(ctx, handle), ctx, 1)
    assert deliveries == [1, 2, 3]
    (record,) = dead_letters(ctx)
    assert record.deliveries == 3
    assert record.error.type == "RuntimeError"
    assert "model exploded" in record.error.message
    assert "Traceback" in record.error.traceback
    assert record.source_id == "e1"
    (done,) = completions(ctx)
    assert done.status == "dead-lettered"
    assert done.error is not None
    assert done.error.type == "RuntimeError"
    assert pending(ctx) == 0


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b'{"type":"new-data","id":"e1","collection":"tickets"}', "records"),
        (b'{"type":"training-request","id":"e1"}', "type"),
        (b"\xff\xfe\x00garbage", "malformed JSON"),
        (b'{"type":"new-data","id":"e1","collection":"x; DROP TABLE y","records":[]}', ""),
    ],
)
def test_poison_entry_is_dead_lettered_at_once(ctx: Context, payload: bytes, reason: str) -> None:
    handled: list[str] = []

    def handle(messages: Sequence[Message[NewData]]) -> None:
        handled.extend(m.event.id for m in messages)

    ctx.redis.xadd(ctx.keys.new_data, {EVENT_FIELD: payload})
    publish(ctx.redis, ctx.keys.new_data, new_data("good"))
    drain(make_worker(ctx, handle), ctx, 2)
    assert handled == ["good"]
    (record,) = dead_letters(ctx)
    assert record.deliveries == 1
    assert record.error.type == "InvalidEvent"
    assert reason in record.error.message
    if record.payload_encoding == "utf-8":
        assert record.payload.encode() == payload
    statuses = sorted(c.status for c in completions(ctx))
    assert statuses == ["dead-lettered", "succeeded"]


def test_entry_without_event_field_is_dead_lettered(ctx: Context) -> None:
    ctx.redis.xadd(ctx.keys.new_data, {"data": "hello"})
    drain(make_worker(ctx, lambda messages: None), ctx, 1)
    (record,) = dead_letters(ctx)
    assert "no 'event' field" in record.error.message
    assert "data" in record.error.message


def test_one_poison_event_does_not_sink_its_batch(ctx: Context) -> None:
    def handle(messages: Sequence[Message[NewData]]) -> list[Outcome]:
        if any(m.event.id == "bad" for m in messages):
            raise InvalidEvent("vector has the wrong dimension")
        return [Succeeded() for _ in messages]

    for event_id in ("a", "bad", "c"):
        publish(ctx.redis, ctx.keys.new_data, new_data(event_id))
    drain(make_worker(ctx, handle), ctx, 3)
    by_id = {c.source_id: c.status for c in completions(ctx)}
    assert by_id == {"a": "succeeded", "bad": "dead-lettered", "c": "succeeded"}
    assert [r.source_id for r in dead_letters(ctx)] == ["bad"]


def test_handler_outcomes_per_message(ctx: Context) -> None:
    def handle(messages: Sequence[Message[NewData]]) -> list[Outcome]:
        return [
            Rejected(error_of("dimension mismatch")) if m.event.id == "bad" else Succeeded()
            for m in messages
        ]

    for event_id in ("a", "bad"):
        publish(ctx.redis, ctx.keys.new_data, new_data(event_id))
    drain(make_worker(ctx, handle), ctx, 2)
    assert [r.error.message for r in dead_letters(ctx)] == ["dimension mismatch"]


def error_of(message: str):  # type: ignore[no-untyped-def]
    from forge.events import ErrorInfo

    return ErrorInfo(type="InvalidEvent", message=message)


def test_permanent_error_is_a_failed_completion_without_retries(ctx: Context) -> None:
    calls: list[int] = []

    def handle(messages: Sequence[Message[NewData]]) -> None:
        calls.append(1)
        raise PermanentError("too few labelled rows")

    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    drain(make_worker(ctx, handle), ctx, 1)
    assert calls == [1]
    (done,) = completions(ctx)
    assert done.status == "failed"
    assert done.error is not None
    assert "too few" in done.error.message
    assert dead_letters(ctx) == []


def test_duplicate_event_has_no_second_effect(ctx: Context) -> None:
    effects: list[str] = []

    def handle(messages: Sequence[Message[NewData]]) -> list[Outcome]:
        effects.extend(m.event.id for m in messages)
        return [Succeeded({"written": 1}) for _ in messages]

    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    drain(make_worker(ctx, handle), ctx, 2)
    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    drain(make_worker(ctx, handle), ctx, 3)
    assert effects == ["e1"]
    dupes = [c.duplicate for c in completions(ctx)]
    assert dupes == [False, True, True]
    assert all(c.result == {"written": 1} for c in completions(ctx))


def test_worker_survives_redis_errors_and_recreates_a_lost_group(ctx: Context) -> None:
    worker = make_worker(ctx, lambda messages: None)
    worker.ctx.broker.ensure_groups(worker.streams)
    with running(worker):
        ctx.redis.delete(ctx.keys.new_data)  # as if Redis restarted without persistence
        publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
        wait_for(lambda: len(completions(ctx)) == 1)


def test_backpressure_bounds_entries_awaiting_redelivery(ctx: Context) -> None:
    ctx = replace(ctx, settings=ctx.settings.replace(max_batch_size=2, redeliver_delay_s=5.0))

    def handle(messages: Sequence[Message[NewData]]) -> None:
        raise RuntimeError("down")

    for i in range(40):
        publish(ctx.redis, ctx.keys.new_data, new_data(f"e{i}"))
    worker = make_worker(ctx, handle)
    worker.ctx.broker.ensure_groups(worker.streams)
    with running(worker):
        wait_for(lambda: pending(ctx) >= 16)
        import time

        time.sleep(0.3)
        assert pending(ctx) == 16  # 4 x max_batch_size, floor 16


def test_redis_connection_errors_back_off_and_resume(ctx: Context) -> None:
    handled: list[str] = []

    def handle(messages: Sequence[Message[NewData]]) -> None:
        handled.extend(m.event.id for m in messages)

    def redis_errors() -> float:
        return sample(ctx.metrics, "forge_infrastructure_errors_total", component="redis")

    # The worker's Redis is behind a port that refuses connections until opened.
    with RefusingThenForwarding.for_url(TEST_REDIS_URL) as gate:
        client = redis.Redis.from_url(gate.url(TEST_REDIS_URL))
        gated = Context(settings=ctx.settings, redis=client, metrics=ctx.metrics)
        worker = make_worker(gated, handle)
        with running(worker):
            wait_for(lambda: redis_errors() >= 2)
            publish(ctx.redis, ctx.keys.new_data, new_data("while-down"))
            assert handled == []
            gate.open()
            wait_for(lambda: len(completions(ctx)) == 1)
        client.close()
    assert handled == ["while-down"]
    (done,) = completions(ctx)
    assert done.status == "succeeded"
    assert done.source_id == "while-down"
    assert pending(ctx) == 0


def test_a_handler_can_ask_for_smaller_batches(ctx: Context) -> None:
    from forge.events import TrainingRequest

    sizes: dict[str, list[int]] = {"new-data": [], "training-requests": []}

    def handle_data(messages: Sequence[Message[NewData]]) -> None:
        sizes["new-data"].append(len(messages))

    def handle_training(messages: Sequence[Message[TrainingRequest]]) -> None:
        sizes["training-requests"].append(len(messages))

    registry = HandlerRegistry()
    registry.register(HandlerSpec("new-data", NewData, handle_data))
    registry.register(
        HandlerSpec("training-requests", TrainingRequest, handle_training, max_batch_size=1)
    )
    worker = Worker(ctx, registry)
    worker.ctx.broker.ensure_groups(worker.streams)
    for i in range(3):
        publish(ctx.redis, ctx.keys.new_data, new_data(f"d{i}"))
        request = {
            "type": "training-request",
            "id": f"t{i}",
            "model": "m",
            "task": "classifier",
            "collection": "c",
        }
        publish(ctx.redis, ctx.keys.training_requests, request)
    with running(worker):
        wait_for(lambda: len(completions(ctx)) == 6)
    assert sizes["training-requests"] == [1, 1, 1]
    assert sizes["new-data"] == [3]
    # While the trainer works on one request, the others stay unread for other workers.
    assert ctx.redis.xpending(ctx.keys.training_requests, ctx.keys.group)["pending"] == 0


def _consumers(ctx: Context, stream: str) -> list[str]:
    try:
        rows = ctx.redis.xinfo_consumers(stream, ctx.keys.group)
    except redis.ResponseError:  # the stream or its group does not exist (yet)
        return []
    return [row["name"].decode() for row in rows]


def test_an_idle_worker_is_listed_in_every_group_it_reads(ctx: Context) -> None:
    from forge.events import TrainingRequest

    registry = HandlerRegistry()
    registry.register(HandlerSpec("new-data", NewData, lambda messages: None))
    registry.register(HandlerSpec("training-requests", TrainingRequest, lambda messages: None))
    worker = Worker(ctx, registry)
    streams = (ctx.keys.new_data, ctx.keys.training_requests)
    with running(worker):
        # Nothing was ever published: Redis would list the consumer only after a read
        # returned entries.
        wait_for(lambda: all(_consumers(ctx, s) == [ctx.consumer] for s in streams))
        ctx.redis.delete(ctx.keys.new_data)  # the group is lost, then recreated
        wait_for(lambda: _consumers(ctx, ctx.keys.new_data) == [ctx.consumer])
        assert ctx.redis.xlen(ctx.keys.new_data) == 0
