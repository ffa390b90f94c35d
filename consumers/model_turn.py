"""``ModelTurn``: the embedding model's turns, one read at a time, first come first served.

A worker holds up to ``FORGE_EMBED_READS_IN_FLIGHT`` new-data reads at once, each in a
slot thread of its own (``forge.runtime.slots``). Their model work takes turns: a read
embeds its texts and queues its writes on the handler's single writer thread, then
hands the turn on, and the next read is embedded while the last rows of the one before
are written. That is the overlap *across* reads; within a read, each chunk's write
already runs beside the next chunk's embedding.

One read in the model at a time keeps the model's threads (or the GPU) on one batch
instead of two reads fighting over the same cores, and since the writer is fed in turn
order, the reads' rows commit in that order. Tickets, not a lock race, decide the
order: a lock makes no promise about which waiter it wakes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ModelTurn:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._issued = 0
        self._serving = 0

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Wait for this caller's turn, hold it for the block, then pass it on."""
        with self._changed:
            ticket = self._issued
            self._issued += 1
            while self._serving != ticket:
                self._changed.wait()
        try:
            yield
        finally:
            with self._changed:
                self._serving += 1
                self._changed.notify_all()
