"""The dead-letter stream: records of entries Forge gave up on, and how operators replay them.

A record keeps the entry's ``event`` field exactly as received, so a replay publishes
the very same bytes back to the source stream.
"""

from __future__ import annotations

import base64
import fnmatch
import heapq
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from forge.errors import InvalidEvent
from forge.events import EVENT_FIELD, DeadLetter, ErrorInfo, decode_as, new_id, utcnow
from forge.keys import Keys
from forge.observability.logging import redact_text
from forge.runtime.broker import StreamBroker
from forge.runtime.entries import Entry, id_key

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
    # The partition whose dead-letter stream holds it; None when unpartitioned.
    partition: int | None = None

    @property
    def ref(self) -> str:
        """How operators name it: the entry id, ``P/ENTRY_ID`` in a partition."""
        return self.entry_id if self.partition is None else f"{self.partition}/{self.entry_id}"


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
    """Operator actions on the dead-letter stream, of every partition: list, show,
    replay, purge. A record of a partition is named ``P/ENTRY_ID`` (``DeadLetterEntry.ref``)."""

    def __init__(self, broker: StreamBroker) -> None:
        self.broker = broker
        self.parts = broker.keys.parts

    def depth(self) -> int:
        return sum(self.broker.dead_letter_depth(part) for part in self.parts)

    def iter_entries(self, batch: int = 500) -> Iterator[DeadLetterEntry]:
        """Every record, oldest first across partitions, read in pages so a deep queue
        is not loaded at once."""
        streams = [self._iter_part(part, batch) for part in self.parts]
        return heapq.merge(*streams, key=lambda e: id_key(e.entry_id))

    def _iter_part(self, part: Keys, batch: int) -> Iterator[DeadLetterEntry]:
        start = "-"
        while True:
            page = self.broker.dead_letters(part, start, "+", batch)
            for entry_id, fields in page:
                yield self._to_entry(part, entry_id, fields)
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

    def show(self, ref: str) -> DeadLetterEntry:
        """The record ``ref`` names: ``P/ENTRY_ID``, or a bare entry id looked up in
        every partition (``KeyError`` if none has it, ``LookupError`` if several do)."""
        partition, entry_id = parse_ref(ref)
        parts = self.parts if partition is None else (self._named_part(partition),)
        found = [
            self._to_entry(part, *page[0])
            for part in parts
            if (page := self.broker.dead_letters(part, entry_id, entry_id, 1))
        ]
        if not found:
            raise KeyError(ref)
        if len(found) > 1:
            refs = ", ".join(item.ref for item in found)
            raise LookupError(f"{ref!r} is in several partitions: name one of {refs}")
        return found[0]

    def replay(self, entries: Sequence[DeadLetterEntry]) -> list[str]:
        """Re-publish each record's payload to its source stream and remove the record,
        one transaction per record (``StreamBroker.replay_dead_letter``)."""
        return [
            self.broker.replay_dead_letter(
                self._part(item),
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
            return sum(self.broker.delete_dead_letter_stream(part) for part in self.parts)
        by_part: dict[int | None, list[str]] = {}
        for item in entries:
            by_part.setdefault(item.partition, []).append(item.entry_id)
        return sum(
            self.broker.delete_dead_letters(self._keys_of(partition), ids)
            for partition, ids in by_part.items()
        )

    def replays_total(self) -> int:
        return sum(self.broker.dead_letter_replays_total(part) for part in self.parts)

    def replay_counts(self, source_ids: Sequence[str]) -> list[int]:
        """How often each event was replayed, over every partition."""
        totals = [0] * len(source_ids)
        for part in self.parts:
            counts = self.broker.dead_letter_replay_counts(source_ids, part)
            totals = [a + b for a, b in zip(totals, counts, strict=True)]
        return totals

    def _named_part(self, partition: int) -> Keys:
        keys = self.broker.keys
        if not keys.partitioned:
            raise LookupError("dead letters are not partitioned here: name a record by its id")
        if partition >= keys.partitions:
            raise LookupError(
                f"no partition {partition}: FORGE_STREAM_PARTITIONS is {keys.partitions}"
            )
        return keys.part(partition)

    def _part(self, item: DeadLetterEntry) -> Keys:
        return self._keys_of(item.partition)

    def _keys_of(self, partition: int | None) -> Keys:
        keys = self.broker.keys
        return keys.parts[0] if partition is None else keys.part(partition)

    @staticmethod
    def _to_entry(part: Keys, entry_id: str, fields: Mapping[bytes, bytes]) -> DeadLetterEntry:
        record = decode_as(DeadLetter, fields[EVENT_FIELD])
        return DeadLetterEntry(entry_id, record, part.partition)


def parse_ref(ref: str) -> tuple[int | None, str]:
    """``P/ENTRY_ID`` -> (P, ENTRY_ID); a bare entry id -> (None, it)."""
    head, sep, tail = ref.partition("/")
    if sep and head.isdigit():
        return int(head), tail
    return None, ref
