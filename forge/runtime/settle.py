"""What settling an entry writes besides the ack: its completion's parts, and the
idempotency marker a later duplicate of its event is answered with."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from forge.events import Completion, ErrorInfo, Status, Timings
from forge.runtime.broker import Entry


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


@dataclass(frozen=True, slots=True)
class BatchTiming:
    """Clock readings of one batch (Unix seconds, comparable with entry ids)."""

    started: float
    handler_s: float
    finished: float
    finished_at: datetime
    # Entries settled without the handler (rejected at decode) -> when that was decided.
    decided_at: dict[str, float] = field(default_factory=dict)

    def timings(self, entry: Entry) -> Timings:
        """``entry``'s timings: those of the batch, unless its fate never waited for
        the handler (then no handler time, and done when decided)."""
        arrived = entry.arrived_at_s
        decided = self.decided_at.get(entry.entry_id)
        handler_s = self.handler_s if decided is None else 0.0
        finished = self.finished if decided is None else decided
        return Timings(
            queue_s=round(max(self.started - arrived, 0.0), 6),
            handler_s=round(handler_s, 6),
            total_s=round(max(finished - arrived, 0.0), 6),
        )
