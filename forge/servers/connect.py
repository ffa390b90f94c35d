"""The one place that makes Redis clients; everything else receives one (``Context``,
``StreamBroker``, the watchers) or asks here. ``servers.endpoints`` decides which server
they talk to (configured or embedded)."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def connect_redis(url: str) -> redis.Redis:
    """A client whose pool reconnects on its own; the worker adds backoff around it."""
    # TCP keepalive notices a peer that vanished without closing; unix sockets have none.
    tcp = {"socket_keepalive": True} if not url.startswith("unix:") else {}
    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30, **tcp)


def connect_redis_probe(url: str) -> redis.Redis:
    """A client for health checks, scrapes and server supervision: fails in about a
    second, no retries.

    redis-py's default retries take seconds against a dead server, longer than a
    Kubernetes probe waits, and a probe must report the outage, not ride it out.
    """
    return redis.Redis.from_url(
        url, socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0)
    )
