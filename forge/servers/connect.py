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
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError
from redis.retry import Retry

# Redis is away for now, and may come back: what loops back off from and retry. On a
# cluster that includes a master restarting (CLUSTERDOWN for about two seconds after
# it starts, a ResponseError in redis-py) and slots nobody serves for a moment.
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
)
# Longer than any blocking read Forge makes (a read block, a completion wait of 1 s):
# a cluster client retries a timed-out command, so a block cut short by the socket
# timeout would take the retries' whole time to fail.
_CLUSTER_SOCKET_TIMEOUT_S = 10.0


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
    """A cluster client. redis-py's cluster client retries a failed command after
    refreshing its slot map, sleeping only on CLUSTERDOWN (0.25 s a time): 20 retries
    ride out the seconds a restarting master answers CLUSTERDOWN; longer outages reach
    the caller's own backoff (``REDIS_UNAVAILABLE``). The URL's node stays the one to
    rediscover the cluster through (a stable name in front of the nodes, typically)."""
    retry = (
        Retry(NoBackoff(), 0)
        if probe
        else Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), 20)
    )
    options.setdefault("socket_timeout", _CLUSTER_SOCKET_TIMEOUT_S)
    client = RedisCluster.from_url(url, retry=retry, dynamic_startup_nodes=False, **options)
    return cast(redis.Redis, client)
