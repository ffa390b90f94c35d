"""What commands tell about the Redis in use: whether a worker may read it, and where
it is."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

from forge.servers.embedded_redis import EmbeddedRedis
from forge.settings import Settings


def worker_may_be_running(settings: Settings) -> bool:
    """False when no worker can be reading: the embedded Redis is in use by nobody.

    A worker holds the embedded server while it runs; a command that finds none starts
    its own, which no worker will ever read. With ``REDIS_URL`` set, workers elsewhere
    may be reading, so the answer is True.
    """
    if settings.redis_url:
        return True
    return EmbeddedRedis(settings.data_dir / "redis").shared_url() is not None


def redis_location(url: str) -> str:
    """Where a Redis URL points: socket path or host and port, database, TLS.

    Not the URL itself: its user info and query (password, certificate paths) stay out
    of output people paste into tickets; ``forge env --redis-url`` prints the URL.
    """
    parts = urlsplit(url)
    db = parse_qs(parts.query).get("db", [""])[0]
    if parts.scheme == "unix":
        where = unquote(parts.path)
    else:
        host = parts.hostname or "localhost"
        host = f"[{host}]" if ":" in host else host
        where = f"{host}:{parts.port or 6379}"
        db = db or parts.path.strip("/")
    tls = ", TLS" if parts.scheme == "rediss" else ""
    return f"{where} db {db or 0}{tls}"
