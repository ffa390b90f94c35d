"""The server's background refresh: ``engine.refresh`` every ``interval_s`` on a thread
of its own, so that loading a new version never holds up a request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

# A refresh that has not succeeded for this many intervals makes /health say so.
STALE_INTERVALS = 20


class Reloader:
    def __init__(self, refresh: Callable[[], None], interval_s: float) -> None:
        self._refresh = refresh
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
        while not self._stop.wait(self.interval_s):
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
