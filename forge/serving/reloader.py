"""The server's background refresh: ``engine.refresh`` on a thread of its own, so that
loading a new version never holds up a request. It runs every ``interval_s``, and at
once when ``wait`` (a blocking read of the change announcements) returns early."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

# A refresh that has not succeeded for this many intervals makes /health say so.
STALE_INTERVALS = 20


class Reloader:
    def __init__(
        self,
        refresh: Callable[[], None],
        interval_s: float,
        wait: Callable[[float], None] | None = None,
    ) -> None:
        self._refresh = refresh
        self._wait = wait
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forge-serve-reload", daemon=True)
        self._ok_s = time.monotonic()
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def stale(self) -> bool:
        return time.monotonic() - self._ok_s > STALE_INTERVALS * self.interval_s

    def _run(self) -> None:
        # A fixed cadence: a change is seen within one interval however long the last
        # refresh took (a registry read under load, a new version loading).
        due_s = time.monotonic() + self.interval_s
        while not self._pause(due_s - time.monotonic()):
            due_s = max(due_s + self.interval_s, time.monotonic())
            try:
                self._refresh()
            except Exception as exc:  # Redis or the registry away: try again next time
                # One warning per outage; the next success says it is over.
                report = log.debug if self._failing else log.warning
                report("serving refresh failed", error=f"{type(exc).__name__}: {exc}")
                self._failing = True
                continue
            if self._failing:
                log.info("serving refresh works again")
            self._failing = False
            self._ok_s = time.monotonic()

    def _pause(self, timeout_s: float) -> bool:
        """Until a change is announced or ``timeout_s`` passed; True once stopped."""
        if self._wait is not None and timeout_s > 0 and not self._stop.is_set():
            try:
                self._wait(timeout_s)
                return self._stop.is_set()
            except Exception:  # Redis away: the refresh that follows says so
                pass
        return self._stop.wait(max(0.0, timeout_s))
