"""Processing and settling as pure logic: records, verdicts, duplicates and the
``Settlement`` a batch builds, asserted without a Redis server.

The broker runs on ``fakeredis`` here: these tests only read markers, last errors and
replay counts. Consumer groups, pending entries, claims and MULTI/EXEC are Redis
semantics and are tested against the real server (tests/test_worker.py and others).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import fakeredis
import msgspec
import pytest

from forge.errors import InvalidEvent, PermanentError, TransientError
from forge.events import (
    EVENT_FIELD,
    Completion,
    DeadLetter,
    ErrorInfo,
    Event,
    NewData,
    Record,
    Timings,
    decode_as,
)
from forge.observability.metrics import DeadLetterReason, Metrics
from forge.observability.metrics import Outcome as OutcomeLabel
from forge.runtime.context import Context
from forge.runtime.entries import Entry, Settlement
from forge.runtime.handlers import Failed, HandlerSpec, Message, Outcome, Rejected, Succeeded
from forge.runtime.observer import NullObserver
from forge.runtime.processing import BatchProcessor
from forge.runtime.retry import Retrier
from forge.runtime.settle import (
    BatchResult,
    BatchTiming,
    DeliveryFailed,
    DoneMarker,
    EntryRecord,
    Exhausted,
    Settler,
    marker_bytes,
)
from forge.settings import Settings
from tests.support.events import new_data

ARRIVED_S = 1_700_000_000.0  # every entry's arrival (its id's millisecond part)
Handle = Callable[[Sequence[Message[NewData]]], Sequence[Outcome] | None]


class FakeClock:
    """Unix time that moves only when told to."""

    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


class RecordingObserver(NullObserver):
    """Keeps what processing reports about outcomes."""

    def __init__(self) -> None:
        self.outcomes: dict[OutcomeLabel, int] = {}
        self.reasons: dict[DeadLetterReason, int] = {}
        self.redeliveries = 0

    def processed(self, stream: str, outcome: OutcomeLabel, count: int) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + count

    def dead_lettered(self, stream: str, reason: DeadLetterReason, count: int) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + count

    def redeliveries_scheduled(self, stream: str, count: int) -> None:
        self.redeliveries += count


@pytest.fixture
def ctx() -> Iterator[Context]:
    """A context on an in-memory Redis (no server): markers, errors, replay counts."""
    settings = Settings(max_deliveries=3, claim_min_idle_s=30.0, idempotency_ttl_s=600)
    context = Context(
        settings=settings, redis=fakeredis.FakeRedis(), metrics=Metrics(gpu=False), consumer="w1"
    )
    yield context
    context.close()


def entry(ctx: Context, seq: int, payload: bytes | None, deliveries: int = 1) -> Entry:
    fields = {} if payload is None else {EVENT_FIELD: payload}
    return Entry(ctx.keys.new_data, f"{int(ARRIVED_S * 1000)}-{seq}", fields, deliveries)


def good(event_id: str) -> bytes:
    return msgspec.json.encode(new_data(event_id))


def process(
    ctx: Context,
    handle: Handle,
    entries: Sequence[Entry],
    *,
    clock: FakeClock | None = None,
    observer: RecordingObserver | None = None,
) -> BatchResult:
    # One attempt: transient failures are not retried in process, so nothing sleeps.
    retrier = Retrier(attempts=1, initial_s=0.0, max_s=0.0)
    processor = BatchProcessor(
        ctx,
        HandlerSpec("new-data", NewData, handle),
        retrier,
        clock=clock or FakeClock(ARRIVED_S),
        observer=observer or NullObserver(),
    )
    return processor.process(ctx.keys.new_data, entries)


def published(settlement: Settlement, stream: str, kind: type[Any]) -> list[Any]:
    return [decode_as(kind, payload) for s, payload in settlement.publishes if s == stream]


def completions(ctx: Context, result: BatchResult) -> dict[str, Completion]:
    found = published(result.settlement, ctx.keys.completions, Completion)
    return {c.source_entry_id: c for c in found}


def dead_letters(ctx: Context, result: BatchResult) -> list[DeadLetter]:
    return published(result.settlement, ctx.keys.dead_letter, DeadLetter)


def written(result: BatchResult) -> dict[str, tuple[bytes, int]]:
    return {key: (value, ttl_s) for key, value, ttl_s in result.settlement.writes}


def succeed(messages: Sequence[Message[NewData]]) -> None:
    return None


# ---------------------------------------------------------------------- records


def test_a_good_entry_gets_a_completion_a_marker_and_an_ack(ctx: Context) -> None:
    e = entry(ctx, 0, good("e1"))
    result = process(ctx, succeed, [e])
    (completion,) = completions(ctx, result).values()
    assert (completion.status, completion.source_id, completion.worker) == ("succeeded", "e1", "w1")
    assert completion.duplicate is False
    marker = ctx.keys.done(ctx.keys.new_data, "e1")
    assert written(result) == {marker: (marker_bytes(completion), 600)}
    assert result.settlement.acks == {ctx.keys.new_data: [e.entry_id]}
    assert result.failed == []
    assert dead_letters(ctx, result) == []


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"{not json", "InvalidEvent"),
        (None, "InvalidEvent"),  # no 'event' field
        (b"x" * 1_048_577, "InvalidEvent"),  # over max_payload_bytes
    ],
)
def test_an_invalid_entry_is_dead_lettered_without_a_marker(
    ctx: Context, payload: bytes | None, error: str
) -> None:
    calls: list[int] = []
    e = entry(ctx, 0, payload)
    result = process(ctx, lambda messages: calls.append(len(messages)), [e])
    assert calls == []  # the handler never saw it
    (completion,) = completions(ctx, result).values()
    assert completion.status == "dead-lettered"
    (record,) = dead_letters(ctx, result)
    assert (record.error.type, record.source_entry_id, record.consumer) == (error, e.entry_id, "w1")
    assert written(result) == {}
    assert result.settlement.acks == {ctx.keys.new_data: [e.entry_id]}
    assert result.outcomes == {"dead-lettered": 1}
    assert result.dead_lettered == {"invalid": 1}


def test_handler_outcomes_are_given_to_their_entries_in_order(ctx: Context) -> None:
    entries = [entry(ctx, i, good(f"e{i}")) for i in range(3)]
    error = ErrorInfo(type="Bad", message="no")
    outcomes: list[Outcome] = [Succeeded({"n": 1}), Failed(error), Rejected(error)]
    result = process(ctx, lambda messages: outcomes, entries)
    done = completions(ctx, result)
    assert [done[e.entry_id].status for e in entries] == ["succeeded", "failed", "dead-lettered"]
    assert done[entries[0].entry_id].result == {"n": 1}
    assert done[entries[1].entry_id].error == error
    # Succeeded and failed events are done (a duplicate is answered alike); a rejected
    # one is not: its replay must run again.
    assert sorted(written(result)) == sorted(
        ctx.keys.done(ctx.keys.new_data, i) for i in ("e0", "e1")
    )
    assert result.outcomes == {"succeeded": 1, "failed": 1, "dead-lettered": 1}


def test_a_handler_returning_the_wrong_number_of_outcomes_is_a_bug(ctx: Context) -> None:
    entries = [entry(ctx, i, good(f"e{i}")) for i in range(2)]
    with pytest.raises(TypeError, match="1 outcomes for 2 messages"):
        process(ctx, lambda messages: [Succeeded()], entries)


def test_events_a_handler_publishes_come_before_the_completion(ctx: Context) -> None:
    extra = NewData(id="out", collection="c", records=[Record(id="r", text="t")])
    outcome = Succeeded(publish=(("forge:model-versions", extra),))
    result = process(ctx, lambda messages: [outcome], [entry(ctx, 0, good("e1"))])
    streams = [stream for stream, _ in result.settlement.publishes]
    assert streams == ["forge:model-versions", ctx.keys.completions]


# ---------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (InvalidEvent("bad"), "dead-lettered"),  # rejected: never retried
        (PermanentError("cannot"), "failed"),  # a valid request that cannot be done
        (TransientError("later"), None),  # left pending for redelivery
        (RuntimeError("bug"), None),
    ],
)
def test_the_verdict_for_an_exception(ctx: Context, exc: Exception, status: str | None) -> None:
    def handle(messages: Sequence[Message[NewData]]) -> None:
        raise exc

    e = entry(ctx, 0, good("e1"))
    result = process(ctx, handle, [e])
    done = completions(ctx, result)
    if status is None:
        assert (done, result.failed) == ({}, [e])
    else:
        assert (done[e.entry_id].status, result.failed) == (status, [])
        error = done[e.entry_id].error
        assert error is not None
        assert (error.type, error.traceback) == (type(exc).__name__, "")  # no traceback


def test_a_failed_delivery_is_left_pending_with_its_error_kept(ctx: Context) -> None:
    observer = RecordingObserver()
    e = entry(ctx, 0, good("e1"))

    def handle(messages: Sequence[Message[NewData]]) -> None:
        raise TransientError("db down")

    result = process(ctx, handle, [e], observer=observer)
    assert result.failed == [e]
    assert result.settlement.acks == {}
    assert result.settlement.publishes == []
    ((key, value, ttl_s),) = result.settlement.writes
    assert key == ctx.keys.last_error(e.stream, e.entry_id)
    assert msgspec.json.decode(value, type=ErrorInfo).message == "db down"
    assert ttl_s == 3600  # max(10 x claim_min_idle_s, an hour)
    assert (observer.outcomes, observer.redeliveries) == ({}, 1)


def test_one_poison_message_does_not_sink_its_neighbours(ctx: Context) -> None:
    entries = [entry(ctx, i, good(f"e{i}")) for i in range(3)]

    def handle(messages: Sequence[Message[NewData]]) -> None:
        if any(m.event.id == "e1" for m in messages):
            raise RuntimeError("poison")

    result = process(ctx, handle, entries)
    assert result.failed == [entries[1]]
    assert sorted(c.source_id or "" for c in completions(ctx, result).values()) == ["e0", "e2"]


# ---------------------------------------------------------------------- duplicates


def test_the_same_event_twice_in_a_batch_runs_once_and_shares_its_fate(ctx: Context) -> None:
    batches: list[list[str]] = []
    first, second = entry(ctx, 0, good("e1")), entry(ctx, 1, good("e1"))
    result = process(ctx, lambda ms: batches.append([m.event.id for m in ms]), [first, second])
    assert batches == [["e1"]]
    done = completions(ctx, result)
    assert (done[first.entry_id].duplicate, done[second.entry_id].duplicate) == (False, True)
    assert done[second.entry_id].status == "succeeded"
    assert len(result.settlement.writes) == 1  # one marker
    assert result.settlement.acks == {ctx.keys.new_data: [first.entry_id, second.entry_id]}
    assert result.outcomes == {"succeeded": 1, "duplicate": 1}


def test_a_batch_duplicate_of_a_failing_delivery_is_redelivered_with_it(ctx: Context) -> None:
    first, second = entry(ctx, 0, good("e1")), entry(ctx, 1, good("e1"))

    def handle(messages: Sequence[Message[NewData]]) -> None:
        raise RuntimeError("down")

    result = process(ctx, handle, [first, second])
    assert result.failed == [first, second]


def test_an_event_done_before_is_answered_from_its_marker(ctx: Context) -> None:
    stored = DoneMarker("succeeded", {"upserted": 2})
    ctx.redis.set(ctx.keys.done(ctx.keys.new_data, "e1"), msgspec.json.encode(stored))
    calls: list[int] = []
    result = process(ctx, lambda ms: calls.append(len(ms)), [entry(ctx, 0, good("e1"))])
    assert calls == []
    (completion,) = completions(ctx, result).values()
    assert (completion.status, completion.result, completion.duplicate) == (
        "succeeded",
        {"upserted": 2},
        True,
    )
    assert result.settlement.writes == []  # the marker stays as it is
    assert result.outcomes == {"duplicate": 1}


def test_a_failed_marker_answers_with_its_error(ctx: Context) -> None:
    error = ErrorInfo(type="Bad", message="no")
    ctx.redis.set(
        ctx.keys.done(ctx.keys.new_data, "e1"), msgspec.json.encode(DoneMarker("failed", {}, error))
    )
    result = process(ctx, succeed, [entry(ctx, 0, good("e1"))])
    (completion,) = completions(ctx, result).values()
    assert (completion.status, completion.error, completion.duplicate) == ("failed", error, True)


# ---------------------------------------------------------------------- exhausted entries


def test_an_entry_out_of_deliveries_is_dead_lettered_with_its_last_error(ctx: Context) -> None:
    kept = entry(ctx, 0, good("kept"), deliveries=4)
    died = entry(ctx, 1, good("died"), deliveries=4)
    ctx.redis.set(
        ctx.keys.last_error(kept.stream, kept.entry_id),
        msgspec.json.encode(ErrorInfo(type="Boom", message="earlier")),
    )
    calls: list[int] = []
    result = process(ctx, lambda ms: calls.append(len(ms)), [kept, died])
    assert calls == []
    errors = {r.source_entry_id: r.error for r in dead_letters(ctx, result)}
    assert errors[kept.entry_id] == ErrorInfo(type="Boom", message="earlier")
    assert errors[died.entry_id].type == "MaxDeliveriesExceeded"
    assert "delivered 3 times" in errors[died.entry_id].message
    assert result.dead_lettered == {"max-deliveries": 2}


def test_a_failure_on_the_last_allowed_delivery_dead_letters_at_once(ctx: Context) -> None:
    last = entry(ctx, 0, good("e1"), deliveries=3)

    def handle(messages: Sequence[Message[NewData]]) -> None:
        raise RuntimeError("again")

    result = process(ctx, handle, [last])
    assert result.failed == []
    (record,) = dead_letters(ctx, result)
    assert (record.error.type, record.deliveries) == ("RuntimeError", 3)
    assert result.settlement.acks == {ctx.keys.new_data: [last.entry_id]}


def test_a_dead_letter_says_how_often_its_event_was_replayed(ctx: Context) -> None:
    ctx.redis.hset(ctx.keys.dead_letter_replays, "e1", 2)
    result = process(ctx, succeed, [entry(ctx, 0, b'{"id": "e1", "type": "nonsense"}')])
    (record,) = dead_letters(ctx, result)
    assert (record.source_id, record.replays) == ("e1", 2)


# ---------------------------------------------------------------------- timings


def test_only_entries_that_waited_for_the_handler_get_its_time(ctx: Context) -> None:
    clock = FakeClock(ARRIVED_S + 1.0)  # read 1 s after arrival

    def handle(messages: Sequence[Message[NewData]]) -> None:
        clock.now_s += 5.0  # the handler takes 5 s

    ran, rejected = entry(ctx, 0, good("ran")), entry(ctx, 1, b"{not json")
    tired = entry(ctx, 2, good("tired"), deliveries=4)
    done = completions(ctx, process(ctx, handle, [ran, rejected, tired], clock=clock))
    assert (done[ran.entry_id].timings.queue_s, done[ran.entry_id].timings.total_s) == (1.0, 6.0)
    for skipped in (rejected, tired):
        assert done[skipped.entry_id].timings == Timings(queue_s=1.0, handler_s=0.0, total_s=1.0)


def test_a_duplicate_answered_from_its_marker_gets_no_handler_time(ctx: Context) -> None:
    ctx.redis.set(ctx.keys.done(ctx.keys.new_data, "old"), marker_value("succeeded"))
    clock = FakeClock(ARRIVED_S + 1.0)

    def handle(messages: Sequence[Message[NewData]]) -> None:
        clock.now_s += 5.0

    old, new = entry(ctx, 0, good("old")), entry(ctx, 1, good("new"))
    done = completions(ctx, process(ctx, handle, [old, new], clock=clock))
    assert done[new.entry_id].timings.handler_s > 0.0
    # Answered before the handler ran: no handler time, done when answered.
    assert done[old.entry_id].timings == Timings(queue_s=1.0, handler_s=0.0, total_s=1.0)


def marker_value(status: str) -> bytes:
    return msgspec.json.encode(DoneMarker(status))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the settler alone


def test_settling_records_without_processing(ctx: Context) -> None:
    """The Settler is the whole of what a batch writes: records in, settlement out."""
    timing = BatchTiming(ARRIVED_S, 0.5, ARRIVED_S + 1.0, _at(ARRIVED_S + 1.0))
    extra: Event = NewData(id="x", collection="c", records=[Record(id="r", text="t")])
    dup = EntryRecord(entry(ctx, 0, good("e1")), verdict=Succeeded(publish=(("s", extra),)))
    dup.duplicate = True
    failed = EntryRecord(entry(ctx, 1, good("e2")), verdict=DeliveryFailed(_error()))
    exhausted = EntryRecord(entry(ctx, 2, good("e3"), deliveries=4), verdict=Exhausted(_error()))
    result = Settler(ctx).settle([dup, failed, exhausted], timing)
    # A duplicate publishes nothing its handler asked for: the first delivery did.
    streams = [s for s, _ in result.settlement.publishes]
    assert streams == [ctx.keys.completions, ctx.keys.completions, ctx.keys.dead_letter]
    assert result.failed == [failed.entry]
    assert result.settlement.acks == {
        ctx.keys.new_data: [dup.entry.entry_id, exhausted.entry.entry_id]
    }
    assert [key for key, _, _ in result.settlement.writes] == [
        ctx.keys.last_error(ctx.keys.new_data, failed.entry.entry_id)
    ]
    assert (result.outcomes, result.dead_lettered) == (
        {"duplicate": 1, "dead-lettered": 1},
        {"max-deliveries": 1},
    )


def test_an_undecided_record_cannot_be_settled(ctx: Context) -> None:
    timing = BatchTiming(ARRIVED_S, 0.0, ARRIVED_S, _at(ARRIVED_S))
    with pytest.raises(RuntimeError, match="never decided"):
        Settler(ctx).settle([EntryRecord(entry(ctx, 0, good("e1")))], timing)


def test_processing_reports_outcomes_once_per_kind(ctx: Context) -> None:
    observer = RecordingObserver()
    entries = [entry(ctx, 0, good("e0")), entry(ctx, 1, good("e0")), entry(ctx, 2, b"{")]
    process(ctx, succeed, entries, observer=observer)
    assert observer.outcomes == {"succeeded": 1, "duplicate": 1, "dead-lettered": 1}
    assert observer.reasons == {"invalid": 1}


def _error() -> ErrorInfo:
    return ErrorInfo(type="Boom", message="no", traceback="tb")


def _at(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)
