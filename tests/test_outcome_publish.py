"""``Succeeded.publish``: events a handler hands the runtime to publish with the ack,
exactly once per input event."""

from __future__ import annotations

from collections.abc import Sequence

from forge.events import EVENT_FIELD, ModelVersion, NewData, decode_as
from forge.runtime.context import Context
from forge.runtime.handlers import Message, Outcome, Succeeded
from tests.support.events import new_data, publish
from tests.support.workers import completions, drain, make_worker, pending


def announcement(ctx: Context, source_id: str) -> tuple[str, ModelVersion]:
    event = ModelVersion(
        id=f"v-{source_id}", model="m", model_version=1, run_id="r", source_id=source_id
    )
    return ctx.keys.model_versions, event


def announced(ctx: Context) -> list[str]:
    entries = ctx.redis.xrange(ctx.keys.model_versions)
    return [decode_as(ModelVersion, f[EVENT_FIELD]).source_id for _, f in entries]


def test_events_go_out_with_the_ack_once_per_input_event(ctx: Context) -> None:
    calls: list[str] = []

    def handle(messages: Sequence[Message[NewData]]) -> list[Outcome]:
        calls.extend(m.event.id for m in messages)
        return [Succeeded({"n": 1}, publish=(announcement(ctx, m.event.id),)) for m in messages]

    # e1 twice in one batch, then again in a later batch (answered from its marker).
    for event_id in ("e1", "e2", "e1"):
        publish(ctx.redis, ctx.keys.new_data, new_data(event_id))
    drain(make_worker(ctx, handle), ctx, 3)
    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    drain(make_worker(ctx, handle), ctx, 4)

    assert calls == ["e1", "e2"]
    assert sorted(announced(ctx)) == ["e1", "e2"]
    assert [c.duplicate for c in completions(ctx)] == [False, False, True, True]
    assert {c.result["n"] for c in completions(ctx)} == {1}
    assert pending(ctx) == 0


def test_a_failed_delivery_publishes_nothing(ctx: Context) -> None:
    attempts: list[int] = []

    def handle(messages: Sequence[Message[NewData]]) -> list[Outcome]:
        attempts.append(messages[0].deliveries)
        if len(attempts) < 2:
            raise RuntimeError("died before finishing")
        return [Succeeded(publish=(announcement(ctx, m.event.id),)) for m in messages]

    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    drain(make_worker(ctx, handle), ctx, 1)
    assert attempts == [1, 2]
    assert announced(ctx) == ["e1"]
