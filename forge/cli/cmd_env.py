"""``forge env``: the URLs of the servers Forge uses, for a shell, redis-cli or psql.

The embedded servers listen on unix sockets whose paths only their logs mention; this
prints them. It starts nothing: an embedded server is found only while a ``forge
worker`` runs it. The lines are plain assignments, not ``export``: eval-ing them gives
the shell the URLs without handing them to later Forge commands, which would then take
a worker's socket for an external server and fail once that worker stops.
"""

from __future__ import annotations

import argparse
import shlex
from urllib.parse import unquote, urlsplit

from forge.errors import ConfigError
from forge.servers.embedded_postgres import running_postgres_url
from forge.servers.embedded_redis import EmbeddedRedis
from forge.settings import Settings

_NOT_RUNNING = "start 'forge worker' (with REDIS_URL and POSTGRES_URL unset) first"


def run_env(args: argparse.Namespace, settings: Settings) -> int:
    redis_url = settings.redis_url or EmbeddedRedis(settings.data_dir / "redis").shared_url()
    postgres_url = settings.postgres_url or running_postgres_url(settings.data_dir / "postgres")
    if args.redis_url or args.redis_socket:
        if redis_url is None:
            raise ConfigError(
                f"no embedded Redis is running under {settings.home_dir}: {_NOT_RUNNING}"
            )
        print(_socket_path(redis_url) if args.redis_socket else redis_url)
        return 0
    if args.postgres_url:
        if postgres_url is None:
            raise ConfigError(
                f"no embedded PostgreSQL is running under {settings.home_dir}: {_NOT_RUNNING}"
            )
        print(postgres_url)
        return 0
    if redis_url is None and postgres_url is None:
        raise ConfigError(
            f"no embedded server is running under {settings.home_dir}: {_NOT_RUNNING}"
        )
    for name, value in _assignments(redis_url, postgres_url):
        print(f"{name}={shlex.quote(value)}")
    return 0


def _assignments(redis_url: str | None, postgres_url: str | None) -> list[tuple[str, str]]:
    lines = []
    if redis_url is not None:
        lines.append(("REDIS_URL", redis_url))
        if redis_url.startswith("unix:"):
            lines.append(("REDIS_SOCKET", _socket_path(redis_url)))
    if postgres_url is not None:
        lines.append(("POSTGRES_URL", postgres_url))
    return lines


def _socket_path(redis_url: str) -> str:
    """The socket path of a ``unix://`` URL (redis-cli 7.0's ``-u`` takes no unix URLs)."""
    parts = urlsplit(redis_url)
    if parts.scheme != "unix":
        raise ConfigError("Redis is not reached through a unix socket here: use --redis-url")
    return unquote(parts.path)
