"""Entry point of the ``forge`` command: argument parsing and error reporting.

Every failure a user can cause (bad arguments, unreachable servers, invalid events)
ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import msgspec
import psycopg
import redis

from forge import __version__
from forge.cli.argtypes import positive_int, positive_seconds
from forge.errors import ForgeError, UsageError
from forge.observability.logging import configure_logging, redact_text
from forge.settings import Settings

EXIT_ERROR = 1
EXIT_USAGE = 2
# libpq's connection-string parse errors (psycopg raises them as ProgrammingError).
_CONNINFO_ERROR_RE = re.compile(r"connection info string|connection option|URI|percent-encoded")
_QUOTED_RE = re.compile(r'"([^"]*)"')

Command = Callable[[argparse.Namespace, Settings], int]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    from forge.cli import (
        cmd_docs,
        cmd_env,
        cmd_models,
        cmd_search,
        cmd_streams,
        cmd_watch,
        cmd_worker,
    )

    parser = _Parser(prog="forge", description="Redis Streams ML training and embedding engine.")
    parser.add_argument("--version", action="version", version=f"forge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    worker = sub.add_parser("worker", help="run consumer-group workers")
    worker.add_argument("--stream", action="append", default=[], help="input stream (repeat)")
    worker.add_argument(
        "--processes",
        type=positive_int,
        default=1,
        help="worker processes under one supervisor that serves /health and /metrics"
        " for all of them (default 1: the worker runs in this process)",
    )
    worker.add_argument(
        "--http-port",
        type=_port,
        default=None,
        help="port of /health and /metrics, 0 for any free one"
        " (default: $FORGE_HTTP_PORT, else 8080)",
    )
    worker.add_argument(
        "--http-host",
        default=None,
        help="address /health and /metrics listen on (default: $FORGE_HTTP_HOST, else 127.0.0.1)",
    )
    worker.add_argument(
        "--consumers", action="append", default=[], help="module:function registering handlers"
    )
    worker.set_defaults(run=cmd_worker.run_worker)

    publish = sub.add_parser("publish", help="validate and publish events to a stream")
    publish.add_argument("stream", help="stream name, e.g. forge:new-data or new-data")
    publish.add_argument("source", help="JSON text, @file (object, array or JSON lines) or -")
    publish.add_argument(
        "--wait",
        action="store_true",
        help="wait for each event's completion and print it; exit 1 unless all succeeded",
    )
    publish.add_argument(
        "--timeout",
        type=positive_seconds,
        default=120.0,
        metavar="S",
        help="with --wait: give up after S seconds (default 120)",
    )
    publish.set_defaults(run=cmd_streams.run_publish)

    status = sub.add_parser(
        "status", help="the Redis in use; length, lag, pending and consumers per stream"
    )
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=cmd_streams.run_status)

    cmd_streams.add_dlq_parser(sub)
    cmd_search.add_search_parser(sub)
    cmd_models.add_models_parser(sub)
    cmd_models.add_predict_parser(sub)
    cmd_watch.add_watch_parser(sub)
    cmd_docs.add_docs_parser(sub)
    cmd_env.add_env_parser(sub)
    cmd_docs.add_schemas_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return _run_reporting_errors(args)


def _run_reporting_errors(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
        if args.command != "worker" and "FORGE_LOG_LEVEL" not in os.environ:
            # One-shot commands print results; their progress chatter is noise.
            settings = settings.replace(log_level="WARNING")
        # Logs go to stderr so that stdout carries only the command's output.
        configure_logging(settings)
        command: Command = args.run
        return command(args, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = describe_error(exc)
        if message is None:
            raise
        sys.stderr.write(f"forge: error: {message}\n")
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR


# Error classes a user can act on, most specific first, and how each is introduced.
_ERROR_PREFIXES: tuple[tuple[type[BaseException], str], ...] = (
    (redis.AuthenticationError, "Redis refused the credentials"),
    (redis.ConnectionError, "cannot reach Redis"),
    (redis.RedisError, "Redis error"),
)


def describe_error(exc: Exception) -> str | None:
    """The one line a user sees for an error they can act on; None for a bug."""
    if isinstance(exc, ForgeError):
        return str(exc)
    text = redact_text(str(exc).splitlines()[0] if str(exc) else "")
    for cls, prefix in _ERROR_PREFIXES:
        if isinstance(exc, cls):
            return f"{prefix}: {text}"
    if isinstance(exc, psycopg.Error):
        return _describe_postgres_error(exc, text)
    if isinstance(exc, OSError | msgspec.DecodeError | ValueError):
        return f"{type(exc).__name__}: {text}"
    return None


def _describe_postgres_error(exc: psycopg.Error, text: str) -> str | None:
    if isinstance(exc, psycopg.OperationalError):
        return f"cannot reach PostgreSQL: {text}"
    if type(exc) is psycopg.ProgrammingError and _CONNINFO_ERROR_RE.search(text):
        # libpq could not parse POSTGRES_URL, and its message quotes the string (or a
        # token of it, such as a mistyped password): say what is wrong, not where.
        return "invalid PostgreSQL connection string: " + _QUOTED_RE.sub(_hide_quoted, text)
    return None


def _hide_quoted(match: re.Match[str]) -> str:
    # One-character quotes ('"="', '"]"') say what is missing and are kept.
    return match.group(0) if len(match.group(1)) < 2 else '"***"'


def entrypoint() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    entrypoint()
