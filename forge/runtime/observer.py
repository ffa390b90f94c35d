"""What the delivery runtime reports as it works: the only way metrics reach it.

The runtime calls a ``RuntimeObserver`` at a few points of each batch (counts per batch,
never per entry); ``forge.observability.runtime_metrics.PrometheusObserver`` turns the
calls into Forge's Prometheus instruments. ``stream`` is always a stream's short name
(``Keys.short``), the ``stream`` label of the metrics.
"""

from __future__ import annotations

from typing import Protocol

from forge.observability.metrics import DeadLetterReason
from forge.observability.metrics import Outcome as OutcomeLabel


class RuntimeObserver(Protocol):
    def received(self, stream: str, count: int) -> None:
        """``count`` new entries were read."""

    def entered_handler(self, stream: str, count: int) -> None:
        """``count`` entries were handed to the handler."""

    def left_handler(self, stream: str, count: int) -> None:
        """The handler returned (or raised) for ``count`` entries."""

    def handler_ran(self, stream: str, elapsed_s: float) -> None:
        """One handling of a batch, isolation retries included, took ``elapsed_s``."""

    def processed(self, stream: str, outcome: OutcomeLabel, count: int) -> None:
        """``count`` entries reached ``outcome``."""

    def dead_lettered(self, stream: str, reason: DeadLetterReason, count: int) -> None:
        """``count`` entries were dead-lettered for ``reason``."""

    def retried(self, stream: str) -> None:
        """The handler is called again after a transient error."""

    def redeliveries_scheduled(self, stream: str, count: int) -> None:
        """``count`` entries failed this delivery and are left pending for another."""

    def reclaimed(self, stream: str, count: int) -> None:
        """``count`` entries were taken over from a silent consumer."""

    def infrastructure_error(self, component: str) -> None:
        """A backing service (``redis``) failed a call."""


class NullObserver:
    """Reports nowhere: for runtime parts used without metrics (tests, tools)."""

    def received(self, stream: str, count: int) -> None:
        pass

    def entered_handler(self, stream: str, count: int) -> None:
        pass

    def left_handler(self, stream: str, count: int) -> None:
        pass

    def handler_ran(self, stream: str, elapsed_s: float) -> None:
        pass

    def processed(self, stream: str, outcome: OutcomeLabel, count: int) -> None:
        pass

    def dead_lettered(self, stream: str, reason: DeadLetterReason, count: int) -> None:
        pass

    def retried(self, stream: str) -> None:
        pass

    def redeliveries_scheduled(self, stream: str, count: int) -> None:
        pass

    def reclaimed(self, stream: str, count: int) -> None:
        pass

    def infrastructure_error(self, component: str) -> None:
        pass
