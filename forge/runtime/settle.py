"""Settling a batch: from each entry's record to the transaction that finishes the batch.

An entry with an outcome gets, in this order, the events its handler asked to publish,
its completion, then a dead-letter record (rejected, exhausted) or an idempotency
marker (so a later duplicate of its event is answered with the same result), and its
ack. An entry whose delivery failed gets no ack: its error is kept for the dead-letter
record of its eventual last delivery, and it is handed back for redelivery.

Nothing here talks to Redis but for the dead-letter replay counts; ``StreamBroker.settle``
sends the ``Settlement`` built here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
import structlog

from forge.events import Completion, ErrorInfo, Status, Timings, new_id
from forge.observability.metrics import DeadLetterReason
from forge.observability.metrics import Outcome as OutcomeLabel
from forge.runtime.context import Context
from forge.runtime.deadletter import build_record, sniff_event_id
from forge.runtime.entries import Entry, Settlement
from forge.runtime.handlers import Failed, Message, Outcome, Rejected, Succeeded

log = structlog.get_logger(__name__)


class DeliveryFailed(msgspec.Struct, frozen=True):
    """The handler still failed after retries: leave the entry pending for redelivery."""

    error: ErrorInfo


class Exhausted(msgspec.Struct, frozen=True):
    """The entry used up ``max_deliveries``: dead-lettered with its last error."""

    error: ErrorInfo


Verdict = Outcome | DeliveryFailed | Exhausted


@dataclass(slots=True)
class EntryRecord:
    """One entry's way through its batch; processing fills it in, settling reads it."""

    entry: Entry
    # The decoded event for the handler; None when the entry never reached it
    # (rejected at decode, or out of deliveries).
    message: Message[Any] | None = None
    verdict: Verdict | None = None
    marker_key: str = ""  # its event's idempotency marker ("" without a message)
    # Answered from a stored marker, or the same event as an earlier entry of the batch.
    duplicate: bool = False
    # When its verdict was reached without waiting for the handler (Unix s), else None.
    decided_at: float | None = None


@dataclass(slots=True)
class BatchResult:
    """The transaction that finishes the batch, the entries to redeliver later, and
    how many entries reached each outcome (for the observer)."""

    settlement: Settlement = field(default_factory=Settlement)
    failed: list[Entry] = field(default_factory=list)
    outcomes: dict[OutcomeLabel, int] = field(default_factory=dict)
    dead_lettered: dict[DeadLetterReason, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BatchTiming:
    """Clock readings of one batch (Unix seconds, comparable with entry ids)."""

    started: float
    handler_s: float
    finished: float
    finished_at: datetime

    def timings(self, record: EntryRecord) -> Timings:
        """The record's timings: those of the batch, unless its verdict never waited
        for the handler (then no handler time, and done when decided)."""
        arrived = record.entry.arrived_at_s
        decided = record.decided_at
        handler_s = self.handler_s if decided is None else 0.0
        finished = self.finished if decided is None else decided
        return Timings(
            queue_s=round(max(self.started - arrived, 0.0), 6),
            handler_s=round(handler_s, 6),
            total_s=round(max(finished - arrived, 0.0), 6),
        )


class Settler:
    """Builds the ``BatchResult`` of a batch's records (one per processor)."""

    def __init__(self, ctx: Context) -> None:
        self._broker = ctx.broker
        self._keys = ctx.keys
        self._consumer = ctx.consumer
        self._marker_ttl_s = ctx.settings.idempotency_ttl_s
        # Kept until the entry's next delivery, even a reclaim (after claim_min_idle_s).
        self._last_error_ttl_s = max(int(ctx.settings.claim_min_idle_s * 10), 3600)

    def settle(self, records: Sequence[EntryRecord], timing: BatchTiming) -> BatchResult:
        result = BatchResult()
        replays = self._replay_counts(records)
        for record in records:
            verdict = record.verdict
            if verdict is None:
                raise RuntimeError(f"entry {record.entry.entry_id} was never decided")
            if isinstance(verdict, DeliveryFailed):
                self._leave_pending(result, record.entry, verdict.error)
            else:
                self._finish(result, record, verdict, timing, replays)
        return result

    def _finish(
        self,
        result: BatchResult,
        record: EntryRecord,
        verdict: Outcome | Exhausted,
        timing: BatchTiming,
        replays: dict[str, int],
    ) -> None:
        """Add the entry's effects, completion, dead letter or marker, and ack."""
        settlement, entry = result.settlement, record.entry
        # Everything the settlement touches lives in the entry's partition (one slot):
        # what the handler publishes to a logical stream goes to the partition's.
        part = self._keys.part_of(entry.stream)
        completion = self._completion(record, verdict, timing)
        if isinstance(verdict, Succeeded) and not record.duplicate:
            # Before the completion, so whoever sees the completion finds these too.
            for stream, event in verdict.publish:
                settlement.publish(part.localize(stream), event)
        settlement.publish(part.completions, completion)
        if isinstance(verdict, Rejected | Exhausted):
            event_id = completion.source_id
            self._dead_letter(settlement, entry, verdict.error, replays.get(event_id or "", 0))
            _log_dead_letter(entry, event_id, _reason(verdict), verdict.error)
        elif record.message is not None and not record.duplicate:
            # Dead letters get no marker: a replay of the same event must run again.
            settlement.write(record.marker_key, marker_bytes(completion), self._marker_ttl_s)
        settlement.ack(entry.stream, entry.entry_id)
        _count(result, verdict, record.duplicate)

    def _dead_letter(
        self, settlement: Settlement, entry: Entry, error: ErrorInfo, replays: int
    ) -> None:
        keys = self._keys
        dead = build_record(
            entry, error, group=keys.group, consumer=self._consumer, replays=replays
        )
        settlement.publish(keys.part_of(entry.stream).dead_letter, dead)

    def _leave_pending(self, result: BatchResult, entry: Entry, error: ErrorInfo) -> None:
        """Keep the error so the eventual dead-letter record says what went wrong, even
        when the last delivery is the one whose worker died."""
        key = self._keys.last_error(entry.stream, entry.entry_id)
        result.settlement.write(key, msgspec.json.encode(error), self._last_error_ttl_s)
        result.failed.append(entry)
        log.warning(
            "delivery failed",
            stream=entry.stream,
            entry_id=entry.entry_id,
            deliveries=entry.deliveries,
            error=f"{error.type}: {error.message}",
        )

    def _replay_counts(self, records: Sequence[EntryRecord]) -> dict[str, int]:
        """How often each event about to be dead-lettered was replayed before."""
        dead = [r for r in records if isinstance(r.verdict, Rejected | Exhausted)]
        ids = [i for i in (sniff_event_id(r.entry.payload) for r in dead) if i]
        if not ids:
            return {}
        # A batch is one stream's, so one partition's.
        part = self._keys.part_of(dead[0].entry.stream)
        return dict(zip(ids, self._broker.dead_letter_replay_counts(ids, part), strict=True))

    def _completion(
        self, record: EntryRecord, verdict: Outcome | Exhausted, timing: BatchTiming
    ) -> Completion:
        status: Status
        if isinstance(verdict, Succeeded):
            status, result, error = "succeeded", verdict.result, None
        elif isinstance(verdict, Failed):
            status, result, error = "failed", {}, verdict.error
        else:
            status, result, error = "dead-lettered", {}, verdict.error
        entry, message = record.entry, record.message
        return Completion(
            id=new_id(),
            created_at=timing.finished_at,
            source_id=message.event.id if message else sniff_event_id(entry.payload),
            source_stream=entry.stream,
            source_entry_id=entry.entry_id,
            status=status,
            worker=self._consumer,
            deliveries=entry.deliveries,
            duplicate=record.duplicate,
            timings=timing.timings(record),
            result=result,
            error=public_error(error),
        )


def _count(result: BatchResult, verdict: Outcome | Exhausted, duplicate: bool) -> None:
    """Count the entry's outcome; a duplicate counts as one whatever its fate (the
    entry of its event that settled first counted that)."""
    outcome: OutcomeLabel
    if duplicate:
        outcome = "duplicate"
    elif isinstance(verdict, Succeeded):
        outcome = "succeeded"
    elif isinstance(verdict, Failed):
        outcome = "failed"
    else:
        outcome = "dead-lettered"
        reason = _reason(verdict)
        result.dead_lettered[reason] = result.dead_lettered.get(reason, 0) + 1
    result.outcomes[outcome] = result.outcomes.get(outcome, 0) + 1


def _reason(verdict: Rejected | Exhausted) -> DeadLetterReason:
    return "max-deliveries" if isinstance(verdict, Exhausted) else "invalid"


def _log_dead_letter(
    entry: Entry, event_id: str | None, reason: DeadLetterReason, error: ErrorInfo
) -> None:
    log.warning(
        "dead-lettered",
        stream=entry.stream,
        entry_id=entry.entry_id,
        event_id=event_id,
        reason=reason,
        deliveries=entry.deliveries,
        error=f"{error.type}: {error.message}",
    )


# ------------------------------------------------------------------ idempotency markers


class DoneMarker(msgspec.Struct):
    """What the idempotency marker stores: enough to answer a duplicate with the same result."""

    status: Status
    result: dict[str, Any] = msgspec.field(default_factory=dict)
    error: ErrorInfo | None = None


_marker_decoder = msgspec.json.Decoder(DoneMarker)
_marker_encoder = msgspec.json.Encoder()
# The marker nearly every entry gets (a handler returning None): encoded once.
_SUCCEEDED_MARKER = _marker_encoder.encode(DoneMarker("succeeded"))


def decode_marker(raw: bytes) -> DoneMarker:
    return _marker_decoder.decode(raw)


def marker_bytes(completion: Completion) -> bytes:
    """The idempotency marker's value: what a duplicate of this event is answered with."""
    if completion.status == "succeeded" and not completion.result and completion.error is None:
        return _SUCCEEDED_MARKER
    return _marker_encoder.encode(
        DoneMarker(completion.status, completion.result, completion.error)
    )


def public_error(error: ErrorInfo | None) -> ErrorInfo | None:
    """Completions carry the error without its traceback (dead-letter records keep it)."""
    if error is None:
        return None
    return ErrorInfo(type=error.type, message=error.message)
