"""The dead-letter stream: records of entries Forge gave up on, and how operators replay them.

A record keeps the entry's ``event`` field exactly as received, so a replay publishes
the very same bytes back to the source stream.
"""

from __future__ import annotations

import base64
import fnmatch
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from forge.errors import InvalidEvent
from forge.events import EVENT_FIELD, DeadLetter, ErrorInfo, decode_as, new_id, utcnow
from forge.observability.logging import redact_text
from forge.runtime.broker import Entry, StreamBroker

_MAX_TRACEBACK_CHARS = 8_000
FILTER_FIELDS = ("source_stream", "source_id", "error_type", "error", "consumer")


class _IdOnly(msgspec.Struct):
    id: str | None = None


def error_info(exc: BaseException) -> ErrorInfo:
    """A serialisable description of an exception, traceback bounded in size.

    Redacted like logs: it is stored in completions and dead-letter records, and an
    exception's message can carry a connection string.
    """
    tb = redact_text("".join(traceback.format_exception(exc))[-_MAX_TRACEBACK_CHARS:])
    return ErrorInfo(type=type(exc).__name__, message=redact_text(str(exc)), traceback=tb)


def sniff_event_id(payload: bytes | None) -> str | None:
    """The event's ``id`` if the payload is JSON with a string id, else None."""
    if not payload:
        return None
    try:
        return msgspec.json.decode(payload, type=_IdOnly).id
    # ValueError covers msgspec's errors and invalid UTF-8 in a string; RecursionError
    # deep nesting: hostile payloads are dead-lettered through here.
    except (ValueError, RecursionError):
        return None


def build_record(
    entry: Entry, error: ErrorInfo, *, group: str, consumer: str, replays: int = 0
) -> DeadLetter:
    payload = entry.payload
    text, encoding = _payload_text(payload)
    if payload is None:
        names = sorted(k.decode(errors="replace") for k in entry.fields)
        text = msgspec.json.encode(
            {
                k.decode(errors="replace"): v.decode(errors="replace")
                for k, v in entry.fields.items()
            }
        ).decode()
        error = ErrorInfo(
            type=error.type,
            message=f"{error.message} (entry fields: {', '.join(names) or 'none'})",
            traceback=error.traceback,
        )
    return DeadLetter(
        id=new_id(),
        created_at=utcnow(),
        source_stream=entry.stream,
        source_entry_id=entry.entry_id,
        source_id=sniff_event_id(payload),
        payload=text,
        payload_encoding=encoding,
        error=error,
        deliveries=entry.deliveries,
        group=group,
        consumer=consumer,
        replays=replays,
    )


def _payload_text(payload: bytes | None) -> tuple[str, Literal["utf-8", "base64"]]:
    if payload is None:
        return "", "utf-8"
    try:
        return payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode("ascii"), "base64"


def payload_bytes(record: DeadLetter) -> bytes:
    if record.payload_encoding == "base64":
        return base64.b64decode(record.payload)
    return record.payload.encode("utf-8")


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    entry_id: str
    record: DeadLetter


def parse_filters(expressions: Sequence[str]) -> dict[str, str]:
    """``["error_type=Invalid*", "source_stream=*new-data"]`` -> a field -> glob mapping."""
    filters: dict[str, str] = {}
    for expr in expressions:
        key, sep, value = expr.partition("=")
        if not sep or key not in FILTER_FIELDS:
            raise InvalidEvent(
                f"bad filter {expr!r}: use FIELD=GLOB with FIELD one of {', '.join(FILTER_FIELDS)}"
            )
        filters[key] = value
    return filters


def matches(record: DeadLetter, filters: Mapping[str, str]) -> bool:
    values = {
        "source_stream": record.source_stream,
        "source_id": record.source_id or "",
        "error_type": record.error.type,
        "error": record.error.message,
        "consumer": record.consumer,
    }
    return all(fnmatch.fnmatchcase(values[k], pattern) for k, pattern in filters.items())


class DeadLetterQueue:
    """Operator actions on the dead-letter stream: list, show, replay, purge."""

    def __init__(self, broker: StreamBroker) -> None:
        self.broker = broker

    def depth(self) -> int:
        return self.broker.dead_letter_depth()

    def iter_entries(self, batch: int = 500) -> Iterator[DeadLetterEntry]:
        """Every record, oldest first, read in pages so a deep queue is not loaded at once."""
        start = "-"
        while True:
            page = self.broker.dead_letters(start, "+", batch)
            for entry_id, fields in page:
                yield self._to_entry(entry_id, fields)
            if len(page) < batch:
                return
            start = f"({page[-1][0]}"

    def select(
        self, filters: Mapping[str, str] | None = None, limit: int | None = None
    ) -> list[DeadLetterEntry]:
        found: list[DeadLetterEntry] = []
        for item in self.iter_entries():
            if filters and not matches(item.record, filters):
                continue
            found.append(item)
            if limit is not None and len(found) >= limit:
                break
        return found

    def show(self, entry_id: str) -> DeadLetterEntry:
        page = self.broker.dead_letters(entry_id, entry_id, 1)
        if not page:
            raise KeyError(entry_id)
        return self._to_entry(*page[0])

    def replay(self, entries: Sequence[DeadLetterEntry]) -> list[str]:
        """Re-publish each record's payload to its source stream and remove the record,
        one transaction per record (``StreamBroker.replay_dead_letter``)."""
        return [
            self.broker.replay_dead_letter(
                item.entry_id,
                item.record.source_stream,
                payload_bytes(item.record),
                item.record.source_id or "",
            )
            for item in entries
        ]

    def purge(self, entries: Sequence[DeadLetterEntry] | None = None) -> int:
        """Delete the given records, or every record when ``entries`` is None."""
        if entries is None:
            return self.broker.delete_dead_letter_stream()
        return self.broker.delete_dead_letters([e.entry_id for e in entries])

    def replays_total(self) -> int:
        return self.broker.dead_letter_replays_total()

    def replay_counts(self, source_ids: Sequence[str]) -> list[int]:
        return self.broker.dead_letter_replay_counts(source_ids)

    @staticmethod
    def _to_entry(entry_id: str, fields: Mapping[bytes, bytes]) -> DeadLetterEntry:
        return DeadLetterEntry(entry_id, decode_as(DeadLetter, fields[EVENT_FIELD]))
