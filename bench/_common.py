"""What every part of the bench harness agrees on: the run's stream prefix and group, the
text model, progress lines, the harness's Redis client and consumer names."""

from __future__ import annotations

import time
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

REPO = Path(__file__).resolve().parents[1]
PREFIX = "forge:"
GROUP = "forge"
MODEL = "all-MiniLM-L6-v2"  # the text collection's; vector-only collections record it too
TEXT_DIM = 384  # all-MiniLM-L6-v2


def log(message: str) -> None:
    """Progress lines with a wall-clock stamp, flushed at once (runs last minutes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def connect(url: str) -> redis.Redis:
    """The harness's own client. Unlike a worker's, it retries a dropped connection:
    the harness only publishes while Redis is up (restarts happen between its calls),
    so a retried command was never executed and cannot be applied twice."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=5, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 40)
    )


def consumer_pid(name: str) -> int:
    """The pid in a consumer name, ``host-pid-suffix`` (forge/runtime/context.py)."""
    return int(name.rsplit("-", 2)[1])
