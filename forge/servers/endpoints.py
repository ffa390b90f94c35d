"""Which servers a process talks to: the configured ones, or the embedded ones, which it
starts (or joins) when ``REDIS_URL`` or ``POSTGRES_URL`` is unset."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import redis

from forge.servers.connect import connect_redis
from forge.servers.embedded_redis import Role, resolve_redis_url
from forge.settings import Settings

if TYPE_CHECKING:
    from forge.vectorstore import VectorStore


@contextmanager
def open_redis(
    settings: Settings, *, role: Role = "command"
) -> Iterator[tuple[redis.Redis, Settings]]:
    """A connected client and the settings with the URL actually used.

    With ``REDIS_URL`` unset this starts (or joins) the embedded redis-server and stops
    it on exit if this process started it. ``role="worker"`` is for processes that run
    until stopped: they never join a server that a one-shot command will stop.
    """
    url, embedded = resolve_redis_url(settings, role=role)
    client = connect_redis(url, cluster=settings.redis_cluster)
    try:
        client.ping()
        yield client, settings.replace(redis_url=url)
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()


def open_vector_store(
    settings: Settings,
    on_close: Callable[[Callable[[], None]], None],
    *,
    connect: Callable[[Callable[[], VectorStore]], VectorStore] = lambda open_: open_(),
) -> VectorStore:
    """An open, migrated vector store on ``POSTGRES_URL`` (embedded when unset).

    ``on_close`` receives the cleanups (the pool, the embedded server) to run at
    shutdown; ``connect`` wraps the opening, for callers that wait out an outage.
    """
    # Here, not at the top: the commands that need only Redis (publish, status, dlq,
    # watch) would otherwise import psycopg, pgvector and numpy for nothing.
    from forge.servers.embedded_postgres import resolve_postgres_url
    from forge.vectorstore import VectorStore

    url, embedded = resolve_postgres_url(settings)
    if embedded is not None:
        on_close(embedded.stop)

    def opened() -> VectorStore:
        store = VectorStore.from_settings(url, settings)
        store.open()
        return store

    store = connect(opened)
    on_close(store.close)
    return store
