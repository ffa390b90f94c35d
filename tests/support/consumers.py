"""Consumer registrations used by tests that run workers in subprocesses."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from forge.events import NewData
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, HandlerSpec, Message, Outcome, Succeeded


def register_slow(registry: HandlerRegistry, ctx: Context) -> None:
    """A new-data handler that announces each batch in Redis, then sleeps."""
    sleep_s = float(os.environ.get("TEST_HANDLER_SLEEP_S", "1.0"))

    def handle(messages: Sequence[Message[NewData]]) -> list[Outcome]:
        for m in messages:
            ctx.redis.rpush(f"{ctx.keys.prefix}started", m.event.id)
        time.sleep(sleep_s)
        for m in messages:
            ctx.redis.rpush(f"{ctx.keys.prefix}handled", m.event.id)
        return [Succeeded({"n": len(m.event.records)}) for m in messages]

    registry.register(HandlerSpec("new-data", NewData, handle, name="slow"))


def register_crash_after_commit(registry: HandlerRegistry, ctx: Context) -> None:
    """The real handlers, but the process dies right after new-data's database commit
    and before the runtime can ack: the crash window exactly-once effects must cover."""
    import signal

    from consumers import register

    inner = HandlerRegistry()
    register(inner, ctx)
    real = inner.get("new-data")

    def handle(messages: Sequence[Message[NewData]]) -> Sequence[Outcome] | None:
        outcomes = real.handle(messages)
        os.kill(os.getpid(), signal.SIGKILL)
        return outcomes

    registry.register(HandlerSpec("new-data", NewData, handle, name="crashing"))


def register_crash_after_register(registry: HandlerRegistry, ctx: Context) -> None:
    """The real training handler, but the process dies right after the model version
    is registered in MLflow and before the runtime can publish its event and ack: the
    window the model-version event's exactly-once publication must cover."""
    import signal

    from consumers import register
    from forge.events import TrainingRequest

    inner = HandlerRegistry()
    register(inner, ctx)
    real = inner.get("training-requests")

    def handle(messages: Sequence[Message[TrainingRequest]]) -> Sequence[Outcome] | None:
        outcomes = real.handle(messages)
        os.kill(os.getpid(), signal.SIGKILL)
        return outcomes

    spec = HandlerSpec("training-requests", TrainingRequest, handle, max_batch_size=1)
    registry.register(spec)


def register_crash_in_backfill(registry: HandlerRegistry, ctx: Context) -> None:
    """The real handlers, one new-data entry per read, but the process dies right after
    re-embedding batch ``TEST_CRASH_BATCH`` is committed and before the runtime can ack
    it: a worker killed mid-backfill, in the window where a batch could count twice."""
    import signal

    from consumers import register
    from forge.events import ReembedBatch

    inner = HandlerRegistry()
    register(inner, ctx)
    real = inner.get("new-data")
    crash_at = int(os.environ["TEST_CRASH_BATCH"])

    def handle(messages: Sequence[Message[NewData]]) -> Sequence[Outcome] | None:
        outcomes = real.handle(messages)
        batches = [m.event for m in messages if isinstance(m.event, ReembedBatch)]
        if any(batch.batch == crash_at for batch in batches):
            os.kill(os.getpid(), signal.SIGKILL)
        return outcomes

    spec = HandlerSpec("new-data", NewData, handle, max_batch_size=1, also=real.also)
    registry.register(spec)
