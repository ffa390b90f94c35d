"""The one place that makes Redis clients; everything else receives one (``Context``,
``StreamBroker``, the watchers) or asks here. ``servers.endpoints`` decides which server
they talk to (configured or embedded).

With ``cluster`` the client is redis-py's ``RedisCluster``, started from any node the
URL names. It speaks the same commands as ``redis.Redis`` and Forge sends it only
commands whose keys share one slot (``forge.keys``), so the rest of Forge holds it as a
``redis.Redis``: typing it as a union everywhere would buy nothing but casts.
"""

from __future__ import annotations

from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry


def connect_redis(url: str, *, cluster: bool = False) -> redis.Redis:
    """A client whose pool reconnects on its own; the worker adds backoff around it."""
    # TCP keepalive notices a peer that vanished without closing; unix sockets have none.
    tcp = {"socket_keepalive": True} if not url.startswith("unix:") else {}
    if cluster:
        return _cluster(url, socket_connect_timeout=5, **tcp)
    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30, **tcp)


def connect_redis_probe(url: str, *, cluster: bool = False) -> redis.Redis:
    """A client for health checks, scrapes and server supervision: fails in about a
    second, no retries.

    redis-py's default retries take seconds against a dead server, longer than a
    Kubernetes probe waits, and a probe must report the outage, not ride it out.
    """
    if cluster:
        return _cluster(url, socket_connect_timeout=1, socket_timeout=1, probe=True)
    return redis.Redis.from_url(
        url, socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0)
    )


def _cluster(url: str, *, probe: bool = False, **options: Any) -> redis.Redis:
    """A cluster client. A master that restarts makes its slots fail for a moment:
    the client refreshes its slot map and retries with backoff, so a worker rides out
    a restart that the outer retries (the worker's backoff) would also cover."""
    retry = Retry(NoBackoff(), 0) if probe else Retry(ExponentialBackoff(cap=2.0, base=0.1), 6)
    client = RedisCluster.from_url(url, retry=retry, **options)
    return cast(redis.Redis, client)
