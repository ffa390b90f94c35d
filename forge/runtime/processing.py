"""From a batch of stream entries to one settled transaction.

For each entry: decode and validate (invalid -> dead letter at once), skip events whose
effects are already done (idempotency markers), run the handler with in-process retries
(a batch that still fails is retried message by message, so one poison event cannot
sink its neighbours), then publish completions, dead letters and done markers and ack,
all in one MULTI/EXEC. A delivery that still fails is left pending for redelivery;
after ``max_deliveries`` failed deliveries it is dead-lettered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from prometheus_client import Counter

from forge.errors import InvalidEvent, PermanentError
from forge.events import Completion, Decoder, ErrorInfo, Event, Status, new_id, utcnow
from forge.runtime.broker import Entry, Settlement
from forge.runtime.context import Context
from forge.runtime.deadletter import DeadLetterQueue, build_record, error_info, sniff_event_id
from forge.runtime.handlers import Failed, HandlerSpec, Message, Outcome, Rejected, Succeeded
from forge.runtime.retry import Retrier
from forge.runtime.settle import BatchTiming, DoneMarker, decode_marker, marker_bytes, public_error

log = structlog.get_logger(__name__)


class DeliveryFailed(msgspec.Struct, frozen=True):
    """The handler still failed after retries: leave the entry pending for redelivery."""

    error: ErrorInfo


class Exhausted(msgspec.Struct, frozen=True):
    """The entry used up ``max_deliveries``: dead-lettered with its last error."""

    error: ErrorInfo


Verdict = Outcome | DeliveryFailed | Exhausted


@dataclass(slots=True)
class BatchResult:
    """The transaction that finishes the batch, and the entries to redeliver later."""

    settlement: Settlement
    failed: list[Entry] = field(default_factory=list)


class BatchProcessor:
    def __init__(
        self,
        ctx: Context,
        spec: HandlerSpec[Any],
        retrier: Retrier,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` tells Unix time, as entry ids do: queue and total times use it."""
        self.ctx = ctx
        self._clock = clock
        self.spec = spec
        self.retrier = retrier
        self.decoder: Decoder[Any] = Decoder(spec.event_type)
        self.dlq = DeadLetterQueue(ctx.broker)
        self.max_deliveries = ctx.settings.max_deliveries
        # Metric children, looked up once (labels() costs a lock and a dict lookup).
        self._processed: dict[str, Counter] = {}
        self._dead_lettered: dict[str, Counter] = {}

    # ------------------------------------------------------------------ entry point

    def process(self, stream: str, entries: Sequence[Entry]) -> BatchResult:
        started = self._clock()
        verdicts: dict[str, Verdict] = {}
        decided_at: dict[str, float] = {}
        messages = self._decode(entries, verdicts, decided_at)
        marker_keys = [self.ctx.keys.done(stream, m.event.id) for m in messages]
        fresh, duplicates = self._split_duplicates(messages, marker_keys)
        handler_s = self._run_handler(fresh, verdicts)
        for entry_id, dup in duplicates.items():
            verdicts[entry_id] = _duplicate_verdict(dup, verdicts)
        self._exhaust_last_deliveries(entries, verdicts)
        by_entry = {m.entry_id: (m, key) for m, key in zip(messages, marker_keys, strict=True)}
        result = BatchResult(Settlement())
        replays = self._replay_counts(entries, verdicts)
        # One clock reading for the whole batch: its completions are published together.
        timing = BatchTiming(started, handler_s, self._clock(), utcnow(), decided_at)
        outcomes: dict[tuple[str, str], int] = {}
        for entry in entries:
            verdict = verdicts[entry.entry_id]
            if isinstance(verdict, DeliveryFailed):
                result.failed.append(entry)
                self._note_failure(result.settlement, entry, verdict)
                continue
            message, marker_key = by_entry.get(entry.entry_id, (None, ""))
            duplicate = entry.entry_id in duplicates
            outcome = self._settle_entry(
                result.settlement, entry, message, marker_key, verdict, duplicate, timing, replays
            )
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        self._count(outcomes)
        return result

    # ------------------------------------------------------------------ decoding

    def _decode(
        self, entries: Sequence[Entry], verdicts: dict[str, Verdict], decided_at: dict[str, float]
    ) -> list[Message[Any]]:
        """Messages for the handler; the others get their verdict, and in ``decided_at``
        the time of it: they do not wait for the handler, so neither do their timings."""
        messages: list[Message[Any]] = []
        limit = self.ctx.settings.max_payload_bytes
        for entry in entries:
            screened = self._screen(entry, limit)
            if isinstance(screened, Message):
                messages.append(screened)
            else:
                verdicts[entry.entry_id] = screened
                decided_at[entry.entry_id] = self._clock()
        return messages

    def _screen(self, entry: Entry, limit: int) -> Message[Any] | Rejected | Exhausted:
        """The entry's message for the handler, or the verdict it gets without one."""
        if entry.deliveries > self.max_deliveries:
            return self._exhausted(entry)
        try:
            event = self._decode_one(entry, limit)
        except InvalidEvent as exc:
            return Rejected(error_info(exc))
        return Message(event, entry.stream, entry.entry_id, entry.deliveries)

    def _decode_one(self, entry: Entry, limit: int) -> Event:
        payload = entry.payload
        if payload is None:
            raise InvalidEvent("entry has no 'event' field")
        if len(payload) > limit:
            raise InvalidEvent(f"payload is {len(payload)} bytes, over the {limit}-byte limit")
        event: Event = self.decoder.decode(payload)
        if event.created_at is None:
            event.created_at = _entry_time(entry)
        return event

    def _exhausted(self, entry: Entry) -> Exhausted:
        """An entry whose worker died (or failed) on each of its allowed deliveries."""
        raw = self.ctx.redis.get(self.ctx.keys.last_error(entry.stream, entry.entry_id))
        if raw is not None:
            last = msgspec.json.decode(raw, type=ErrorInfo)
            return Exhausted(last)
        message = (
            f"delivered {entry.deliveries - 1} times without completing "
            f"(max_deliveries={self.ctx.settings.max_deliveries}); its workers died holding it"
        )
        return Exhausted(ErrorInfo(type="MaxDeliveriesExceeded", message=message))

    # ------------------------------------------------------------------ idempotency

    def _split_duplicates(
        self, messages: list[Message[Any]], marker_keys: list[str]
    ) -> tuple[list[Message[Any]], dict[str, DoneMarker | str]]:
        """Fresh messages, and duplicates: entry id -> stored marker, or the entry id of
        an earlier message in this same batch with the same event id."""
        stored = self.ctx.broker.done_results(marker_keys)
        fresh: list[Message[Any]] = []
        duplicates: dict[str, DoneMarker | str] = {}
        first_seen: dict[str, str] = {}
        for message, raw in zip(messages, stored, strict=True):
            if raw is not None:
                duplicates[message.entry_id] = decode_marker(raw)
            elif message.event.id in first_seen:
                duplicates[message.entry_id] = first_seen[message.event.id]
            else:
                first_seen[message.event.id] = message.entry_id
                fresh.append(message)
        return fresh, duplicates

    # ------------------------------------------------------------------ handling

    def _run_handler(self, messages: list[Message[Any]], verdicts: dict[str, Verdict]) -> float:
        if not messages:
            return 0.0
        started = time.perf_counter()
        metrics = self.ctx.metrics
        stream_label = self.spec.stream
        metrics.events_in_progress.labels(stream=stream_label).inc(len(messages))
        try:
            verdicts.update(self._handle_batch(messages))
        finally:
            metrics.events_in_progress.labels(stream=stream_label).dec(len(messages))
        elapsed = time.perf_counter() - started
        metrics.handler_duration_seconds.labels(stream=stream_label).observe(elapsed)
        return elapsed

    def _handle_batch(self, messages: list[Message[Any]]) -> dict[str, Verdict]:
        try:
            outcomes = self.retrier.call(lambda: self.spec.handle(messages))
        except Exception as exc:
            if len(messages) == 1:
                return {messages[0].entry_id: _verdict_for(exc)}
            log.warning(
                "batch failed, isolating messages",
                stream=self.spec.stream,
                size=len(messages),
                error=f"{type(exc).__name__}: {exc}",
            )
            isolated: dict[str, Verdict] = {}
            for message in messages:
                isolated.update(self._handle_batch([message]))
            return isolated
        return _align(messages, outcomes)

    # ------------------------------------------------------------------ settling

    def _settle_entry(
        self,
        settlement: Settlement,
        entry: Entry,
        message: Message[Any] | None,
        marker_key: str,
        verdict: Outcome | Exhausted,
        duplicate: bool,
        timing: BatchTiming,
        replays: dict[str, int],
    ) -> tuple[str, str]:
        """Add the entry's completion, dead letter or marker, and ack; returns its
        outcome and dead-letter reason (``""`` when not dead-lettered) for the metrics."""
        keys = self.ctx.keys
        outcome = _outcome(verdict, duplicate)
        completion = self._completion(entry, message, verdict, timing)
        completion.duplicate = duplicate
        if isinstance(verdict, Succeeded) and not duplicate:
            # Before the completion, so whoever sees the completion finds these too.
            for stream, event in verdict.publish:
                settlement.publish(stream, event)
        settlement.publish(keys.completions, completion)
        if isinstance(verdict, Rejected | Exhausted):
            record = build_record(
                entry,
                verdict.error,
                group=keys.group,
                consumer=self.ctx.consumer,
                replays=replays.get(completion.source_id or "", 0),
            )
            settlement.publish(keys.dead_letter, record)
            _log_dead_letter(entry, completion.source_id, outcome[1], verdict.error)
        elif message is not None and not duplicate:
            # Dead letters get no marker: a replay of the same event must run again.
            ttl_s = self.ctx.settings.idempotency_ttl_s
            settlement.write(marker_key, marker_bytes(completion), ttl_s)
        settlement.ack(entry.stream, entry.entry_id)
        return outcome

    def _exhaust_last_deliveries(
        self, entries: Sequence[Entry], verdicts: dict[str, Verdict]
    ) -> None:
        """A failure on the last allowed delivery dead-letters the entry now."""
        for entry in entries:
            verdict = verdicts[entry.entry_id]
            if isinstance(verdict, DeliveryFailed) and entry.deliveries >= self.max_deliveries:
                verdicts[entry.entry_id] = Exhausted(verdict.error)

    def _replay_counts(
        self, entries: Sequence[Entry], verdicts: dict[str, Verdict]
    ) -> dict[str, int]:
        """How often each event about to be dead-lettered was replayed before."""
        ids = [
            sniff_event_id(e.payload) or ""
            for e in entries
            if isinstance(verdicts[e.entry_id], Rejected | Exhausted)
        ]
        ids = [i for i in ids if i]
        return dict(zip(ids, self.dlq.replay_counts(ids), strict=True))

    def _note_failure(self, settlement: Settlement, entry: Entry, verdict: DeliveryFailed) -> None:
        """Keep the error so the eventual dead-letter record says what went wrong, even
        when the last delivery is the one whose worker died."""
        ttl_s = max(int(self.ctx.settings.claim_min_idle_s * 10), 3600)
        key = self.ctx.keys.last_error(entry.stream, entry.entry_id)
        settlement.write(key, msgspec.json.encode(verdict.error), ttl_s)
        self.ctx.metrics.redeliveries_total.labels(stream=self.spec.stream).inc()
        log.warning(
            "delivery failed",
            stream=entry.stream,
            entry_id=entry.entry_id,
            deliveries=entry.deliveries,
            error=f"{verdict.error.type}: {verdict.error.message}",
        )

    def _completion(
        self,
        entry: Entry,
        message: Message[Any] | None,
        verdict: Outcome | Exhausted,
        timing: BatchTiming,
    ) -> Completion:
        status: Status
        if isinstance(verdict, Succeeded):
            status, result, error = "succeeded", verdict.result, None
        elif isinstance(verdict, Failed):
            status, result, error = "failed", {}, verdict.error
        else:
            status, result, error = "dead-lettered", {}, verdict.error
        return Completion(
            id=new_id(),
            created_at=timing.finished_at,
            source_id=message.event.id if message else sniff_event_id(entry.payload),
            source_stream=entry.stream,
            source_entry_id=entry.entry_id,
            status=status,
            worker=self.ctx.consumer,
            deliveries=entry.deliveries,
            timings=timing.timings(entry),
            result=result,
            error=public_error(error),
        )

    def _count(self, outcomes: dict[tuple[str, str], int]) -> None:
        """Count a batch's outcomes: one increment per kind, not one per entry."""
        metrics = self.ctx.metrics
        stream = self.spec.stream
        for (outcome, reason), count in outcomes.items():
            if reason:
                dead = self._dead_lettered.get(reason)
                if dead is None:
                    dead = metrics.dead_lettered_total.labels(stream=stream, reason=reason)
                    self._dead_lettered[reason] = dead
                dead.inc(count)
            processed = self._processed.get(outcome)
            if processed is None:
                processed = metrics.events_processed_total.labels(stream=stream, outcome=outcome)
                self._processed[outcome] = processed
            processed.inc(count)


def _log_dead_letter(entry: Entry, event_id: str | None, reason: str, error: ErrorInfo) -> None:
    log.warning(
        "dead-lettered",
        stream=entry.stream,
        entry_id=entry.entry_id,
        event_id=event_id,
        reason=reason,
        deliveries=entry.deliveries,
        error=f"{error.type}: {error.message}",
    )


def _outcome(verdict: Outcome | Exhausted, duplicate: bool) -> tuple[str, str]:
    """The ``outcome`` label of an entry, and its dead-letter ``reason`` (or ``""``)."""
    if duplicate:
        return "duplicate", ""
    if isinstance(verdict, Succeeded):
        return "succeeded", ""
    if isinstance(verdict, Failed):
        return "failed", ""
    return "dead-lettered", "max-deliveries" if isinstance(verdict, Exhausted) else "invalid"


def _verdict_for(exc: BaseException) -> Verdict:
    if isinstance(exc, InvalidEvent):
        return Rejected(error_info(exc))
    if isinstance(exc, PermanentError):
        return Failed(error_info(exc))
    return DeliveryFailed(error_info(exc))


def _align(
    messages: Sequence[Message[Any]], outcomes: Sequence[Outcome] | None
) -> dict[str, Verdict]:
    if outcomes is None:
        return {m.entry_id: Succeeded() for m in messages}
    if len(outcomes) != len(messages):
        raise TypeError(f"handler returned {len(outcomes)} outcomes for {len(messages)} messages")
    return {m.entry_id: o for m, o in zip(messages, outcomes, strict=True)}


def _duplicate_verdict(dup: DoneMarker | str, verdicts: dict[str, Verdict]) -> Verdict:
    if isinstance(dup, str):  # same event twice in one batch: share the first one's fate
        return verdicts[dup]
    if dup.status == "failed" and dup.error is not None:
        return Failed(dup.error)
    return Succeeded(dup.result)


def _entry_time(entry: Entry) -> datetime:
    return datetime.fromtimestamp(entry.arrived_at_s, UTC)
