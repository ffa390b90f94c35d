"""From a batch of stream entries to the records settling turns into one transaction.

Each entry gets an ``EntryRecord``, and each step fills records in, in this order:

1. screen: an entry out of deliveries is exhausted, an invalid one rejected (both
   decided at once, without the handler); the others are decoded for the handler;
2. duplicates: an event whose idempotency marker is stored is answered from it, and
   an event seen earlier in the same batch shares that entry's fate;
3. handle: the fresh messages go to the handler with in-process retries (a batch that
   still fails is retried message by message, so one poison event cannot sink its
   neighbours);
4. a delivery that failed on its last allowed delivery is exhausted now.

``settle.Settler`` then builds the batch's ``Settlement`` (completions, dead letters,
done markers, acks, kept errors; ``StreamBroker.settle`` writes it in one atomic script call),
and the outcomes are reported to the observer. A delivery that still failed is left
pending for redelivery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

from forge.errors import InvalidEvent, PermanentError
from forge.events import Decoder, ErrorInfo, Event, utcnow
from forge.runtime.context import Context
from forge.runtime.deadletter import error_info
from forge.runtime.entries import Entry
from forge.runtime.handlers import Failed, HandlerSpec, Message, Outcome, Rejected, Succeeded
from forge.runtime.observer import RuntimeObserver
from forge.runtime.retry import Retrier
from forge.runtime.settle import (
    BatchResult,
    BatchTiming,
    DeliveryFailed,
    EntryRecord,
    Exhausted,
    Settler,
    Verdict,
    decode_marker,
)

log = structlog.get_logger(__name__)

# Records whose message goes to the handler, with that message.
Fresh = list[tuple[EntryRecord, Message[Any]]]
# Records of an event seen earlier in the batch, with the record of its first entry.
Echoes = list[tuple[EntryRecord, EntryRecord]]

# What a handler returning None gives every message: frozen, so one serves them all.
_SUCCEEDED = Succeeded()


class BatchProcessor:
    """Processes the batches of one stream with its handler."""

    def __init__(
        self,
        ctx: Context,
        spec: HandlerSpec[Any],
        retrier: Retrier,
        *,
        clock: Callable[[], float] = time.time,
        observer: RuntimeObserver | None = None,
    ) -> None:
        """``clock`` tells Unix time, as entry ids do: queue and total times use it.
        ``observer`` defaults to the context's."""
        self.ctx = ctx
        self.spec = spec
        self.retrier = retrier
        self.decoder: Decoder[Any] = Decoder(spec.event_type, spec.also)
        self.settler = Settler(ctx)
        self._clock = clock
        self._observer = ctx.observer if observer is None else observer
        self._max_deliveries = ctx.settings.max_deliveries
        self._max_payload_bytes = ctx.settings.max_payload_bytes

    def process(self, stream: str, entries: Sequence[Entry]) -> BatchResult:
        """Decide every entry of this batch of ``stream`` and build its settlement."""
        started = self._clock()
        records = [self._screen(entry) for entry in entries]
        fresh, echoes = self._find_duplicates(stream, records)
        handler_s = self._handle(fresh)
        for echo, first in echoes:  # the same event twice in one batch: one fate
            echo.verdict = first.verdict
        _exhaust_last_deliveries(records, self._max_deliveries)
        # One clock reading for the whole batch: its completions are published together.
        timing = BatchTiming(started, handler_s, self._clock(), utcnow())
        result = self.settler.settle(records, timing)
        self._report(result)
        return result

    # ------------------------------------------------------------------ screening

    def _screen(self, entry: Entry) -> EntryRecord:
        """The entry's record: with a message for the handler, or with the verdict it
        gets without one (and the time of it: its timings do not wait for the handler)."""
        if entry.deliveries > self._max_deliveries:
            return EntryRecord(entry, verdict=self._exhausted(entry), decided_at=self._clock())
        try:
            event = self._decode(entry)
        except InvalidEvent as exc:
            return EntryRecord(entry, verdict=Rejected(error_info(exc)), decided_at=self._clock())
        return EntryRecord(entry, Message(event, entry.stream, entry.entry_id, entry.deliveries))

    def _decode(self, entry: Entry) -> Event:
        payload, limit = entry.payload, self._max_payload_bytes
        if payload is None:
            raise InvalidEvent("entry has no 'event' field")
        if len(payload) > limit:
            raise InvalidEvent(f"payload is {len(payload)} bytes, over the {limit}-byte limit")
        event: Event = self.decoder.decode(payload)
        if event.created_at is None:
            event.created_at = datetime.fromtimestamp(entry.arrived_at_s, UTC)
        return event

    def _exhausted(self, entry: Entry) -> Exhausted:
        """An entry whose worker died (or failed) on each of its allowed deliveries."""
        raw = self.ctx.broker.last_error(entry.stream, entry.entry_id)
        if raw is not None:
            return Exhausted(msgspec.json.decode(raw, type=ErrorInfo))
        message = (
            f"delivered {entry.deliveries - 1} times without completing "
            f"(max_deliveries={self._max_deliveries}); its workers died holding it"
        )
        return Exhausted(ErrorInfo(type="MaxDeliveriesExceeded", message=message))

    # ------------------------------------------------------------------ idempotency

    def _find_duplicates(self, stream: str, records: list[EntryRecord]) -> tuple[Fresh, Echoes]:
        """The records with a message that is not a duplicate (for the handler), and
        the duplicates of an earlier record of this batch, each with that record.
        Duplicates of an event done before get their verdict from its stored marker."""
        keys = self.ctx.keys
        decoded = [(r, r.message) for r in records if r.message is not None]
        for record, message in decoded:
            record.marker_key = keys.done(stream, message.event.id)
        stored = self.ctx.broker.done_results([r.marker_key for r, _ in decoded])
        answered_at = self._clock()
        fresh: Fresh = []
        echoes: Echoes = []
        first_seen: dict[str, EntryRecord] = {}
        for (record, message), raw in zip(decoded, stored, strict=True):
            first = first_seen.get(message.event.id)
            if raw is not None:
                record.duplicate = True
                record.verdict = _marker_verdict(raw)
                # Answered without the handler, like a rejected entry.
                record.decided_at = answered_at
            elif first is not None:
                record.duplicate = True
                echoes.append((record, first))
            else:
                first_seen[message.event.id] = record
                fresh.append((record, message))
        return fresh, echoes

    # ------------------------------------------------------------------ handling

    def _handle(self, fresh: Fresh) -> float:
        """Run the handler on the fresh messages and give each record its verdict;
        returns the seconds it took."""
        if not fresh:
            return 0.0
        messages = [message for _, message in fresh]
        stream, count = self.spec.stream, len(messages)
        started = time.perf_counter()
        self._observer.entered_handler(stream, count)
        try:
            verdicts = self._handle_batch(messages)
        finally:
            self._observer.left_handler(stream, count)
        elapsed_s = time.perf_counter() - started
        self._observer.handler_ran(stream, elapsed_s)
        for (record, _), verdict in zip(fresh, verdicts, strict=True):
            record.verdict = verdict
        return elapsed_s

    def _handle_batch(self, messages: list[Message[Any]]) -> list[Verdict]:
        """One verdict per message, in order."""
        try:
            outcomes = self.retrier.call(lambda: self.spec.handle(messages))
        except Exception as exc:
            if len(messages) == 1:
                return [_verdict_for(exc)]
            log.warning(
                "batch failed, isolating messages",
                stream=self.spec.stream,
                size=len(messages),
                error=f"{type(exc).__name__}: {exc}",
            )
            return [v for message in messages for v in self._handle_batch([message])]
        return _aligned(messages, outcomes)

    # ------------------------------------------------------------------ reporting

    def _report(self, result: BatchResult) -> None:
        """Count the batch's outcomes: one call per kind, not one per entry."""
        observer, stream = self._observer, self.spec.stream
        for reason, count in result.dead_lettered.items():
            observer.dead_lettered(stream, reason, count)
        for outcome, count in result.outcomes.items():
            observer.processed(stream, outcome, count)
        if result.failed:
            observer.redeliveries_scheduled(stream, len(result.failed))


def _exhaust_last_deliveries(records: Sequence[EntryRecord], max_deliveries: int) -> None:
    """A failure on the last allowed delivery dead-letters the entry now."""
    for record in records:
        verdict = record.verdict
        if isinstance(verdict, DeliveryFailed) and record.entry.deliveries >= max_deliveries:
            record.verdict = Exhausted(verdict.error)


def _verdict_for(exc: BaseException) -> Verdict:
    if isinstance(exc, InvalidEvent):
        return Rejected(error_info(exc))
    if isinstance(exc, PermanentError):
        return Failed(error_info(exc))
    return DeliveryFailed(error_info(exc))


def _aligned(messages: Sequence[Message[Any]], outcomes: Sequence[Outcome] | None) -> list[Verdict]:
    if outcomes is None:
        return [_SUCCEEDED] * len(messages)
    if len(outcomes) != len(messages):
        raise TypeError(f"handler returned {len(outcomes)} outcomes for {len(messages)} messages")
    return list(outcomes)


def _marker_verdict(raw: bytes) -> Verdict:
    """What an event done before is answered with: the outcome its marker stored."""
    done = decode_marker(raw)
    if done.status == "failed" and done.error is not None:
        return Failed(done.error)
    return Succeeded(done.result)
