"""In-process retries of transient failures (tenacity), the runtime's one retry policy.

Only errors ``forge.errors.is_transient`` accepts are retried: connection losses,
timeouts, resource exhaustion. Exponential backoff with full jitter, bounded both in
attempts and in total time, so a dead dependency cannot hold a batch forever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import structlog
import tenacity

from forge.errors import is_transient
from forge.settings import Settings

T = TypeVar("T")
log = structlog.get_logger(__name__)


class Retrier:
    """Calls a function, retrying transient errors with exponential backoff and jitter."""

    def __init__(
        self,
        *,
        attempts: int,
        initial_s: float,
        max_s: float,
        on_retry: Callable[[BaseException, int], None] | None = None,
        max_total_s: float | None = None,
    ) -> None:
        self.attempts = attempts
        self.initial_s = initial_s
        self.max_s = max_s
        self.max_total_s = max_total_s
        self.on_retry = on_retry

    @classmethod
    def from_settings(
        cls, settings: Settings, on_retry: Callable[[BaseException, int], None] | None = None
    ) -> Retrier:
        return cls(
            attempts=settings.retry_attempts,
            initial_s=settings.retry_backoff_initial_s,
            max_s=settings.retry_backoff_max_s,
            on_retry=on_retry,
        )

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if exc is None:
            return
        log.warning(
            "transient error, retrying",
            error=f"{type(exc).__name__}: {exc}",
            attempt=state.attempt_number,
            sleep_s=round(state.upcoming_sleep, 3),
        )
        if self.on_retry is not None:
            self.on_retry(exc, state.attempt_number)

    def call(self, fn: Callable[[], T]) -> T:
        stop: tenacity.stop.stop_base = tenacity.stop_after_attempt(self.attempts)
        if self.max_total_s is not None:
            stop = stop | tenacity.stop_after_delay(self.max_total_s)
        retrying = tenacity.Retrying(
            stop=stop,
            wait=tenacity.wait_random_exponential(multiplier=self.initial_s, max=self.max_s),
            retry=tenacity.retry_if_exception(is_transient),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        return retrying(fn)
