"""Running a worker in a test and reading what it left in Redis."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from forge.events import EVENT_FIELD, Completion, DeadLetter, NewData, decode_as
from forge.runtime.context import Context
from forge.runtime.deadletter import DeadLetterQueue
from forge.runtime.entries import id_key
from forge.runtime.handlers import HandlerRegistry, HandlerSpec, Message, Outcome
from forge.runtime.worker import Worker
from tests.support.redis_helpers import running, wait_for

Handle = Callable[[Sequence[Message[NewData]]], Sequence[Outcome] | None]


def make_worker(ctx: Context, handle: Handle) -> Worker:
    """A worker whose only handler is ``handle``, for new-data."""
    registry = HandlerRegistry()
    registry.register(HandlerSpec("new-data", NewData, handle))
    return Worker(ctx, registry)


def completions(ctx: Context) -> list[Completion]:
    """Every completion on ``ctx``'s completions streams (of every partition), oldest
    first."""
    entries = [
        entry
        for stream in ctx.keys.physical_outputs(ctx.keys.completions)
        for entry in ctx.redis.xrange(stream)
    ]
    entries.sort(key=lambda entry: id_key(entry[0].decode()))
    return [decode_as(Completion, fields[EVENT_FIELD]) for _, fields in entries]


def dead_letters(ctx: Context) -> list[DeadLetter]:
    return [e.record for e in DeadLetterQueue(ctx.broker).select()]


def pending(ctx: Context) -> int:
    """Entries of the new-data stream read by the group but not acknowledged."""
    streams = ctx.keys.physical(ctx.keys.new_data)
    return sum(int(ctx.redis.xpending(s, ctx.keys.group)["pending"]) for s in streams)


def drain(worker: Worker, ctx: Context, expected_completions: int, timeout_s: float = 10) -> None:
    """Run ``worker`` until ``expected_completions`` completions are on the stream."""
    worker.ctx.broker.ensure_groups(worker.streams)
    with running(worker):
        wait_for(lambda: len(completions(ctx)) >= expected_completions, timeout_s)
