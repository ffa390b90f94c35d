"""What a running worker hands its handlers: settings, connections, metrics, identity."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
import structlog

from forge.events import Event
from forge.keys import Keys
from forge.observability.metrics import Metrics
from forge.observability.runtime_metrics import PrometheusObserver
from forge.runtime.broker import StreamBroker
from forge.runtime.observer import RuntimeObserver
from forge.settings import Settings

log = structlog.get_logger(__name__)


def make_consumer_name() -> str:
    """Unique per process, readable in XINFO CONSUMERS: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Context:
    """Immutable: ``keys`` and ``broker`` are derived from ``settings`` once, so they
    cannot disagree with it. For other settings make a new one with
    ``dataclasses.replace(ctx, settings=...)``, which derives them again.

    The runtime reports through ``observer``, derived from ``metrics`` the same way;
    handlers update their own instruments on ``metrics`` directly.
    """

    settings: Settings
    redis: redis.Redis
    metrics: Metrics
    consumer: str = field(default_factory=make_consumer_name)
    keys: Keys = field(init=False)
    broker: StreamBroker = field(init=False)
    observer: RuntimeObserver = field(init=False)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        keys = Keys.from_settings(self.settings)
        # A frozen dataclass sets its own derived fields through object.__setattr__.
        object.__setattr__(self, "keys", keys)
        broker = StreamBroker(self.redis, keys, maxlen=self.settings.stream_maxlen)
        object.__setattr__(self, "broker", broker)
        observer: RuntimeObserver = PrometheusObserver(self.metrics)
        object.__setattr__(self, "observer", observer)

    def publish(self, stream: str, event: Event) -> str:
        """Publish an event to an output stream (trimmed)."""
        return self.broker.publish(stream, event)

    def on_close(self, fn: Callable[[], None]) -> None:
        """Register a resource cleanup (pools, models) to run when the worker stops."""
        self._closers.append(fn)

    def close(self) -> None:
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception:
                log.exception("error while closing a worker resource")
        self._closers.clear()
