"""When a new-data worker builds a collection's deferred HNSW index.

Collections that new-data events create start without their index while
``FORGE_BULK_LOAD_ROWS`` is above 0 (``forge.vectorstore.deferred``: searches are exact
scans meanwhile). The handler tells the ``IndexKeeper`` which collections each read
wrote to, and the keeper has a collection's index built, once, by whichever worker gets
the builder lock, as soon as either holds:

- it holds ``FORGE_BULK_LOAD_ROWS`` rows and no entry waits on the new-data stream for
  a worker (the group's lag is 0): a large first load is written to its end, or a
  trickle has grown to where exact scans stop being cheap. Below that count a drained
  stream proves nothing: a load's first read, taken by an idle worker, is usually a
  single event, with the rest of the load still being published;
- nobody has written to it for ``FORGE_BULK_LOAD_QUIET_S``: the load is over, whatever
  its size. A small collection is so indexed that long after its last write, and a load
  that stalls gets its index rather than exact scans for ever.

With ``FORGE_BULK_LOAD_ROWS=0`` collections get their index at creation, and one left
without it (created while deferral was on) is built at once.

Checks and builds run on a thread of the keeper's own, started by a write and ended
when nothing is left to watch: a read never waits for them, and the worker keeps
ingesting while its keeper builds. A build that dies (the worker is killed) leaves an
invalid index and releases the lock; the next write to the collection, or the next
keeper to start (it looks for collections without their index first), builds it again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import redis
import structlog
from psycopg_pool import PoolClosed

from forge.settings import Settings
from forge.vectorstore import VectorStore

log = structlog.get_logger(__name__)

# Entries waiting on a stream for the group's workers; ``None``: Redis cannot tell.
Backlog = Callable[[str], int | None]
# A check that keeps failing (the database is away) is given up after this many tries;
# the collection's next write watches it again.
MAX_FAILURES = 3


@dataclass(slots=True)
class _Watch:
    """A collection that may be waiting for its index: the stream its last write came
    from, when this worker last wrote to it and when to look at it next (``clock``),
    whether it was seen with ``FORGE_BULK_LOAD_ROWS`` rows, until when another process
    holds its build, and failed checks in a row."""

    stream: str | None
    last_write_s: float
    due_s: float
    large: bool = False
    busy_until_s: float = 0.0
    failures: int = 0


class IndexKeeper:
    """Thread-safe. ``background=False`` (tests): no thread; call ``check_due``.
    ``sweep``: first look for collections left without their index."""

    def __init__(
        self,
        settings: Settings,
        store: Callable[[], VectorStore],
        backlog: Backlog | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
        sweep: bool = True,
    ) -> None:
        self._rows = settings.bulk_load_rows
        self._quiet_s = settings.bulk_load_quiet_s
        self._store = store
        self._backlog = backlog
        self._clock = clock
        self._background = background
        self._watches: dict[str, _Watch] = {}
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._swept = not sweep

    def wrote(self, collection: str, stream: str | None) -> None:
        """A read wrote to ``collection``, from ``stream``: look at it now."""
        now = self._clock()
        with self._changed:
            before = self._watches.get(collection)
            if before is None:
                self._watches[collection] = _Watch(stream, now, now)
            else:  # while another process builds its index, no use asking at every read
                due_s = max(now, before.busy_until_s)
                watch = _Watch(stream, now, due_s, before.large, before.busy_until_s)
                self._watches[collection] = watch
            if self._background and self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="forge-index-keeper", daemon=True
                )
                self._thread.start()
            self._changed.notify()

    def watching(self) -> set[str]:
        with self._changed:
            return set(self._watches)

    def check_due(self) -> None:
        """Look at every watched collection that is due: build its index, or set when
        to look again, or forget it (it has its index, or is gone)."""
        if not self._swept:
            self._sweep()
        now = self._clock()
        with self._changed:
            due = [(name, w) for name, w in self._watches.items() if w.due_s <= now]
        for name, watch in due:
            try:
                again = self._check(name, watch)
            except PoolClosed:  # the store closed: the worker is stopping
                with self._changed:
                    self._watches.clear()
                return
            except psycopg.errors.UndefinedTable:  # dropped while looked at
                again = None
            except Exception as exc:
                watch.failures += 1
                again = None if watch.failures >= MAX_FAILURES else self._clock() + self._quiet_s
                log.warning("deferred index check failed", collection=name, error=str(exc))
            with self._changed:
                if self._watches.get(name) is watch:  # else written since: due again
                    if again is None:
                        del self._watches[name]
                    else:
                        watch.due_s = again

    # ------------------------------------------------------------------ internals

    def _run(self) -> None:
        while True:
            failed = False
            try:
                self.check_due()
            except Exception as exc:  # the thread must outlive it: watches need it
                failed = True
                log.warning("deferred index checks failed", error=str(exc))
            with self._changed:
                if not self._watches:  # nothing left: a later write starts another thread
                    self._thread = None
                    return
                wait_s = min(w.due_s for w in self._watches.values()) - self._clock()
                if failed or wait_s > 0:
                    self._changed.wait(self._quiet_s if failed else wait_s)

    def _sweep(self) -> None:
        """Watch the collections left without their index (by a worker that died
        before it built one): the next check asks whether their load is over."""
        self._swept = True
        try:
            found = self._store().indexes.unindexed()
        except Exception as exc:
            log.warning("could not look for deferred indexes", error=str(exc))
            return
        now = self._clock()
        with self._changed:
            for name in found:
                self._watches.setdefault(name, _Watch(None, now - self._quiet_s, now))

    def _check(self, name: str, watch: _Watch) -> float | None:
        """When to look at ``name`` again; ``None``: never (it has its index now)."""
        indexes = self._store().indexes
        found = indexes.pending(name, 0 if watch.large else self._rows)
        if found is None:
            return None
        watch.large = watch.large or (self._rows > 0 and found.rows >= self._rows)
        if not self._rows or (watch.large and self._caught_up(watch.stream)):
            return self._build(name, watch)
        now = self._clock()
        if now - watch.last_write_s < self._quiet_s:
            return watch.last_write_s + self._quiet_s
        quiet_s = indexes.quiet_s(found.collection)  # other workers' writes too
        if quiet_s is not None and quiet_s < self._quiet_s:
            return now + self._quiet_s - quiet_s
        return self._build(name, watch)

    def _caught_up(self, stream: str | None) -> bool:
        return self._backlog is not None and stream is not None and self._backlog(stream) == 0

    def _build(self, name: str, watch: _Watch) -> float | None:
        started = time.perf_counter()
        result = self._store().indexes.build(name)
        if result == "busy":  # its holder builds it; look again in case that one dies
            watch.busy_until_s = self._clock() + self._quiet_s
            return watch.busy_until_s
        if result == "built":
            log.info("deferred index built", collection=name, build_s=time.perf_counter() - started)
        return None


def stream_backlog(client: redis.Redis, group: str) -> Backlog:
    """Entries waiting on a stream for ``group``'s workers (the group's XINFO lag)."""

    def backlog(stream: str) -> int | None:
        try:
            groups = client.xinfo_groups(stream)
        except redis.ResponseError:  # no such stream
            return None
        for info in groups:
            name = info["name"]
            if (name.decode() if isinstance(name, bytes) else name) == group:
                lag = info.get("lag")
                return None if lag is None else int(lag)
        return None

    return backlog
