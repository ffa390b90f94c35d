"""Lease renewal: keeps entries a worker is still working on from being reclaimed.

A background thread resets the idle time of in-flight entries (XCLAIM JUSTID, which
does not count a delivery) every ``lease_renew_interval_s``, a third of the reclaim
threshold, so a 40-minute training is never taken over while its worker lives. A
thread, not the worker loop, because a handler blocked in C code (a GPU kernel, a
database call) must not stop the renewals.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog

from forge.runtime.broker import StreamBroker

log = structlog.get_logger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        broker: StreamBroker,
        consumer: str,
        interval_s: float,
        on_error: Callable[[BaseException], None] | None = None,
        on_renewed: Callable[[], None] | None = None,
    ) -> None:
        self._broker = broker
        self._consumer = consumer
        self._interval_s = interval_s
        self._on_error = on_error
        # Lets the health check see a worker busy in a long handler as alive.
        self._on_renewed = on_renewed
        self._held: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="forge-lease", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def hold(self, stream: str, entry_ids: list[str]) -> None:
        with self._lock:
            self._held.setdefault(stream, set()).update(entry_ids)

    def release(self, stream: str, entry_ids: list[str]) -> None:
        with self._lock:
            held = self._held.get(stream)
            if held is not None:
                held.difference_update(entry_ids)

    @contextmanager
    def holding(self, stream: str, entry_ids: list[str]) -> Iterator[None]:
        """Keep renewing these entries while the block runs, and not after."""
        self.hold(stream, entry_ids)
        try:
            yield
        finally:
            self.release(stream, entry_ids)

    def held(self) -> dict[str, list[str]]:
        with self._lock:
            return {stream: sorted(ids) for stream, ids in self._held.items() if ids}

    def renew_now(self) -> None:
        held = self.held()
        for stream, ids in held.items():
            self._broker.renew(stream, self._consumer, ids)
        if held and self._on_renewed is not None:
            self._on_renewed()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.renew_now()
            except Exception as exc:  # the next tick tries again; a lapse only risks a rerun
                log.warning("lease renewal failed", error=f"{type(exc).__name__}: {exc}")
                if self._on_error is not None:
                    self._on_error(exc)
