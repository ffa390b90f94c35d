"""Opening connections for commands: the configured Redis, or the embedded one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from forge.context import connect_redis
from forge.embedded_redis import resolve_redis_url
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
