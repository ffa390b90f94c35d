"""Batches that run beside the worker loop: up to ``concurrency`` at once per handler.

A handler whose spec asks for ``concurrency`` above 1 (the trainer, with
``FORGE_TRAINING_CONCURRENCY``) gets that many slots. Each batch of its streams (all
lanes of a prioritized stream share the slots) runs in a thread of its own, from
processing to settling, while the loop goes on reading: a worker runs N trainings at
once, and still embeds while they run. The loop reads such a stream only while a slot
is free (``Slots`` is the source's ``Room``), and a batch taken in a race beyond that
waits here, leased, and starts on the first free slot, the highest priority first.

A slot's failure to reach Redis is raised again in the loop (``collect``), which backs
off as for its own batches; its entries stay pending and are redelivered or reclaimed.
On shutdown (``drain``) running batches finish and settle; batches still waiting are
let go, pending, for another worker to reclaim.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from forge.runtime.entries import Entry
from forge.runtime.lease import LeaseKeeper

# Processes and settles a batch of a stream; returns its entries that failed.
RunBatch = Callable[[str, list[Entry]], list[Entry]]


@dataclass(frozen=True, slots=True)
class Finished:
    """A batch done in a slot: its stream, its size, and its entries to redeliver."""

    stream: str
    size: int
    failed: list[Entry]


@dataclass(frozen=True, slots=True)
class _Waiting:
    rank: int  # the stream's lane: 0 is the highest priority
    stream: str
    batch: list[Entry]


class Slots:
    def __init__(
        self,
        pools: Mapping[str, tuple[str, int]],
        lease: LeaseKeeper,
        run: RunBatch,
        ranks: Mapping[str, int] | None = None,
    ) -> None:
        """``pools``: stream -> (the pool it shares slots in, that pool's slot count);
        ``ranks``: a stream's priority rank (0 highest) among its pool's streams."""
        self._pools = dict(pools)
        self._ranks = dict(ranks or {})
        self._lease = lease
        self._run = run
        self._running: dict[str, int] = {pool: 0 for pool, _ in self._pools.values()}
        self._waiting: list[_Waiting] = []
        self._finished: list[Finished] = []
        self._errors: list[BaseException] = []
        self._threads: set[threading.Thread] = set()
        self._changed = threading.Condition()
        self._closed = False

    def handles(self, stream: str) -> bool:
        return stream in self._pools

    # ------------------------------------------------------------------ the source's Room

    def has_room(self, stream: str) -> bool:
        if stream not in self._pools:
            return True
        pool, size = self._pools[stream]
        with self._changed:
            waiting = sum(self._pools[w.stream][0] == pool for w in self._waiting)
            return self._running[pool] + waiting < size

    def wait_for_room(self, timeout_s: float) -> None:
        with self._changed:
            self._changed.wait(timeout_s)

    # ------------------------------------------------------------------ batches

    def submit(self, stream: str, batch: list[Entry]) -> None:
        """Run ``batch`` in a free slot, else keep it leased until one frees up."""
        self._lease.hold(stream, [e.entry_id for e in batch])
        with self._changed:
            self._waiting.append(_Waiting(self._ranks.get(stream, 0), stream, batch))
            self._start_waiting()

    def collect(self) -> list[Finished]:
        """Batches finished since the last call; raises a slot's error in the caller."""
        with self._changed:
            finished, self._finished = self._finished, []
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]
        return finished

    def drain(self, timeout_s: float | None = None) -> None:
        """Start nothing more, let waiting batches go (still pending) and wait for the
        running ones to finish."""
        with self._changed:
            self._closed = True
            for waiting in self._waiting:
                self._lease.release(waiting.stream, [e.entry_id for e in waiting.batch])
            self._waiting.clear()
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout_s)

    # ------------------------------------------------------------------ helpers

    def _start_waiting(self) -> None:
        """Start the best waiting batches that have a free slot (lock held)."""
        self._waiting.sort(key=lambda w: w.rank)  # stable: arrival order within a rank
        for waiting in list(self._waiting):
            pool, size = self._pools[waiting.stream]
            if self._closed or self._running[pool] >= size:
                continue
            self._waiting.remove(waiting)
            self._running[pool] += 1
            thread = threading.Thread(
                target=self._slot, args=(waiting.stream, waiting.batch), name="forge-slot"
            )
            self._threads.add(thread)
            thread.start()

    def _slot(self, stream: str, batch: list[Entry]) -> None:
        try:
            failed = self._run(stream, batch)
        except BaseException as exc:
            with self._changed:
                self._errors.append(exc)
        else:
            with self._changed:
                self._finished.append(Finished(stream, len(batch), failed))
        finally:
            self._lease.release(stream, [e.entry_id for e in batch])
            with self._changed:
                self._running[self._pools[stream][0]] -= 1
                self._threads.discard(threading.current_thread())
                self._start_waiting()
                self._changed.notify_all()
