"""``Once``: how every handler opens what it needs (a store, the training service, MLflow)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Once(Generic[T]):
    """A factory called at most once, on first use: handlers that share one share what
    it makes, and a worker that never needs it never opens it (no connection to
    PostgreSQL or MLflow for a stream it does not serve)."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._value: T | None = None
        self._lock = threading.Lock()

    def __call__(self) -> T:
        with self._lock:
            if self._value is None:
                self._value = self._factory()
            return self._value
