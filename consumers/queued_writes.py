"""Writes queued on a handler's single writer thread, and the records they hold.

A chunk's rows are queued as soon as they are embedded; until their transaction
commits, a fingerprint query cannot see them, so a later read must not take those
records as unchanged (``QueuedIds``). ``raise_failed`` stops a read from embedding on
once one of its writes has failed: the database is gone, say, and the batch will be
retried anyway.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

from consumers.record_writes import PendingEvent
from forge.runtime.handlers import Outcome


class NotWritten(Exception):
    """A queued chunk left unwritten because a chunk queued before it failed."""


@dataclass(frozen=True, slots=True)
class QueuedWrite:
    """A chunk's queued write, and the (collection, record id) pairs it writes."""

    future: futures.Future[dict[int, Outcome]]
    ids: list[tuple[str, str]]


class QueuedIds:
    """The records whose rows are queued on the writer and not yet committed, counted
    (two reads in flight may both write one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: Counter[tuple[str, str]] = Counter()

    def add(self, collection: str, events: list[PendingEvent]) -> list[tuple[str, str]]:
        """Count the records the events' writes change (an unchanged record has none)."""
        ids = [(collection, w.id) for item in events for w in item.writes]
        with self._lock:
            self._count.update(ids)
        return ids

    def of(self, collection: str) -> set[str]:
        with self._lock:
            return {record_id for (name, record_id) in self._count if name == collection}

    def done(self, written: list[list[tuple[str, str]]]) -> None:
        with self._lock:
            for ids in written:
                self._count.subtract(ids)
            self._count = +self._count  # drop the zeros


def raise_failed(queued: Iterable[futures.Future[Any]]) -> None:
    """Raise the error of the first queued write that has already failed, if any."""
    for future in queued:
        if future.done() and future.exception() is not None:
            future.result()
