"""The runtime's observations (``forge.runtime.observer``) as Forge's Prometheus instruments."""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from forge.observability.metrics import DeadLetterReason, Metrics
from forge.observability.metrics import Outcome as OutcomeLabel

M = TypeVar("M", Counter, Gauge, Histogram)


class _Children(Generic[M]):
    """One instrument's label children, each looked up once: ``labels()`` takes a lock
    and builds a key on every call, and the runtime reports on every batch."""

    __slots__ = ("_children", "_instrument")

    def __init__(self, instrument: M) -> None:
        self._instrument: M = instrument
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self._children.get(labels)
        if child is None:
            # Two threads may both get here (the lease thread reports errors too):
            # ``labels()`` hands both the same child.
            child = self._instrument.labels(*labels)
            self._children[labels] = child
        return child


class PrometheusObserver:
    """A ``RuntimeObserver`` updating ``metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._received = _Children(metrics.events_received_total)
        self._in_progress = _Children(metrics.events_in_progress)
        self._handler_s = _Children(metrics.handler_duration_seconds)
        self._processed = _Children(metrics.events_processed_total)
        self._dead_lettered = _Children(metrics.dead_lettered_total)
        self._retries = _Children(metrics.retries_total)
        self._redeliveries = _Children(metrics.redeliveries_total)
        self._reclaimed = _Children(metrics.reclaimed_total)
        self._errors = _Children(metrics.infrastructure_errors_total)

    def received(self, stream: str, count: int) -> None:
        self._received(stream).inc(count)

    def entered_handler(self, stream: str, count: int) -> None:
        self._in_progress(stream).inc(count)

    def left_handler(self, stream: str, count: int) -> None:
        self._in_progress(stream).dec(count)

    def handler_ran(self, stream: str, elapsed_s: float) -> None:
        self._handler_s(stream).observe(elapsed_s)

    def processed(self, stream: str, outcome: OutcomeLabel, count: int) -> None:
        self._processed(stream, outcome).inc(count)

    def dead_lettered(self, stream: str, reason: DeadLetterReason, count: int) -> None:
        self._dead_lettered(stream, reason).inc(count)

    def retried(self, stream: str) -> None:
        self._retries(stream).inc()

    def redeliveries_scheduled(self, stream: str, count: int) -> None:
        self._redeliveries(stream).inc(count)

    def reclaimed(self, stream: str, count: int) -> None:
        self._reclaimed(stream).inc(count)

    def infrastructure_error(self, component: str) -> None:
        self._errors(component).inc()
