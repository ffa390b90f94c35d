"""What a running worker hands its handlers: settings, connections, metrics, identity."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from forge.broker import StreamBroker
from forge.events import Event
from forge.keys import Keys
from forge.metrics import Metrics
from forge.settings import Settings

log = structlog.get_logger(__name__)


def make_consumer_name() -> str:
    """Unique per process, readable in XINFO CONSUMERS: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def connect_redis(url: str) -> redis.Redis:
    """A client whose pool reconnects on its own; the worker adds backoff around it."""
    # TCP keepalive notices a peer that vanished without closing; unix sockets have none.
    tcp = {"socket_keepalive": True} if not url.startswith("unix:") else {}
    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30, **tcp)


def connect_redis_probe(url: str) -> redis.Redis:
    """A client for health checks and scrapes: fails in about a second, no retries.

    redis-py's default retries take seconds against a dead server, longer than a
    Kubernetes probe waits, and a probe must report the outage, not ride it out.
    """
    return redis.Redis.from_url(
        url, socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0)
    )


@dataclass
class Context:
    settings: Settings
    redis: redis.Redis
    metrics: Metrics
    consumer: str = field(default_factory=make_consumer_name)
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keys = Keys(prefix=self.settings.stream_prefix, group=self.settings.group)
        self.broker = StreamBroker(self.redis, self.keys, maxlen=self.settings.stream_maxlen)

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
