"""What a batch says about each of its entries: completion ids and timings, dead-letter
records and the worker's log, driven through ``BatchProcessor`` with a fake clock."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from unittest.mock import ANY

import msgspec
from structlog.testing import capture_logs

from forge.events import EVENT_FIELD, Completion, NewData, Timings
from forge.runtime.context import Context
from forge.runtime.entries import Entry
from forge.runtime.handlers import HandlerSpec, Message
from forge.runtime.processing import BatchProcessor
from forge.runtime.retry import Retrier
from tests.support.events import new_data
from tests.support.workers import completions, dead_letters

ARRIVED_MS = 1_700_000_000_000  # every entry's arrival: entry ids are chosen here
Handle = Callable[[Sequence[Message[NewData]]], None]


class FakeClock:
    """Unix time that moves only when told to."""

    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def _read(ctx: Context, payloads: Sequence[bytes]) -> list[Entry]:
    stream = ctx.keys.new_data
    for seq, payload in enumerate(payloads):
        ctx.redis.xadd(stream, {EVENT_FIELD: payload}, id=f"{ARRIVED_MS}-{seq}")
    ctx.broker.ensure_groups([stream])
    return ctx.broker.read([stream], ctx.consumer, len(payloads), None)


def _settle(
    ctx: Context, handle: Handle, entries: list[Entry], clock: FakeClock | None = None
) -> dict[str, Completion]:
    """Process one batch and settle it; the completions by entry id."""
    spec = HandlerSpec("new-data", NewData, handle)
    retrier = Retrier.from_settings(ctx.settings)
    processor = BatchProcessor(ctx, spec, retrier, clock=clock or FakeClock(ARRIVED_MS / 1000))
    ctx.broker.settle(processor.process(ctx.keys.new_data, entries).settlement)
    return {c.source_entry_id: c for c in completions(ctx)}


def _exhausted(ctx: Context, entry: Entry) -> Entry:
    """``entry`` as delivered once more than allowed (its workers died holding it)."""
    return dataclasses.replace(entry, deliveries=ctx.settings.max_deliveries + 1)


def _good(event_id: str) -> bytes:
    return msgspec.json.encode(new_data(event_id))


def test_an_unknown_event_id_is_null_in_completion_and_dead_letter(ctx: Context) -> None:
    done = _settle(ctx, lambda messages: None, _read(ctx, [b"{not json"]))
    (completion,) = done.values()
    assert completion.status == "dead-lettered"
    assert completion.source_id is None
    (record,) = dead_letters(ctx)
    assert record.source_id is None
    ((_, fields),) = ctx.redis.xrange(ctx.keys.completions)
    assert msgspec.json.decode(fields[EVENT_FIELD])["source_id"] is None


def test_entries_settled_without_the_handler_have_no_handler_time(ctx: Context) -> None:
    clock = FakeClock(ARRIVED_MS / 1000 + 1.0)  # the batch is read 1 s after arrival

    def handle(messages: Sequence[Message[NewData]]) -> None:
        clock.now_s += 5.0  # the handler takes 5 s

    good, malformed, tired = _read(ctx, [_good("good"), b"{not json", _good("tired")])
    done = _settle(ctx, handle, [good, malformed, _exhausted(ctx, tired)], clock)

    ran = done[good.entry_id].timings
    assert (ran.queue_s, ran.total_s) == (1.0, 6.0)
    assert ran.handler_s > 0.0
    # Rejected at decode, before the handler ran: read 1 s after arrival, done then.
    for skipped in (malformed, tired):
        assert done[skipped.entry_id].status == "dead-lettered"
        assert done[skipped.entry_id].timings == Timings(queue_s=1.0, handler_s=0.0, total_s=1.0)


def test_each_dead_letter_is_logged_with_its_reason(ctx: Context) -> None:
    def handle(messages: Sequence[Message[NewData]]) -> None:
        raise RuntimeError("model exploded")

    malformed, tired, last = _read(ctx, [b"{not json", _good("tired"), _good("last")])
    tired = _exhausted(ctx, tired)
    # Its last allowed delivery, and the handler fails it.
    last = dataclasses.replace(last, deliveries=ctx.settings.max_deliveries)
    with capture_logs() as logs:
        _settle(ctx, handle, [malformed, tired, last])

    def logged(entry: Entry, event_id: str | None, reason: str) -> dict[str, object]:
        return {
            "event": "dead-lettered",
            "log_level": "warning",
            "stream": ctx.keys.new_data,
            "entry_id": entry.entry_id,
            "event_id": event_id,
            "reason": reason,
            "deliveries": entry.deliveries,
            "error": ANY,
        }

    assert [e for e in logs if e["event"] == "dead-lettered"] == [
        logged(malformed, None, "invalid"),
        logged(tired, "tired", "max-deliveries"),
        logged(last, "last", "max-deliveries"),
    ]
    assert logs[-1]["error"] == "RuntimeError: model exploded"
    assert len(dead_letters(ctx)) == 3
