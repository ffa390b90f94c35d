"""Opening connections for commands: the configured Redis, or the embedded one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from forge.context import connect_redis
from forge.embedded_redis import EmbeddedRedis, resolve_redis_url
from forge.settings import Settings


@contextmanager
def open_redis(settings: Settings) -> Iterator[tuple[redis.Redis, Settings]]:
    """A connected client and the settings with the URL actually used.

    With ``REDIS_URL`` unset this starts (or joins) the embedded redis-server and stops
    it on exit if this process started it.
    """
    url, embedded = resolve_redis_url(settings)
    client = connect_redis(url)
    try:
        client.ping()
        yield client, settings.replace(redis_url=url)
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()


def worker_may_be_running(settings: Settings) -> bool:
    """False when no worker can be reading: the embedded Redis is in use by nobody.

    A worker holds the embedded server while it runs; a command that finds none starts
    its own, which no worker will ever read. With ``REDIS_URL`` set, workers elsewhere
    may be reading, so the answer is True.
    """
    if settings.redis_url:
        return True
    return EmbeddedRedis(settings.data_dir / "redis").shared_url() is not None
