"""Entry point of the ``forge`` command: argument parsing and error reporting.

Every failure a user can cause (bad arguments, unreachable servers, invalid events)
ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import msgspec

from forge.cli.command import EXIT_USAGE, Command
from forge.cli.parsers import build_parser
from forge.errors import ForgeError, UsageError
from forge.settings import Settings

if TYPE_CHECKING:
    import psycopg

__all__ = ["build_parser", "describe_error", "entrypoint", "exit_now", "main"]

EXIT_ERROR = 1
# What CPython exits with when it cannot flush stdout or stderr at exit.
EXIT_FLUSH_FAILED = 120
# libpq's connection-string parse errors (psycopg raises them as ProgrammingError).
_CONNINFO_ERROR_RE = re.compile(r"connection info string|connection option|URI|percent-encoded")
_QUOTED_RE = re.compile(r'"([^"]*)"')
# Commands that run until stopped: they log at the configured level and exit fully.
_LONG_RUNNING = frozenset({"worker", "serve"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return _run_reporting_errors(args)


def entrypoint() -> NoReturn:
    """The ``forge`` program: ``main`` and a quick exit (see ``exit_now``)."""
    args = build_parser().parse_args()
    code = _run_reporting_errors(args)
    if args.command in _LONG_RUNNING:
        # The interpreter's full exit: a worker's or server's stop is not waited on at a
        # prompt, and they are the commands that run other processes and servers for long.
        raise SystemExit(code)
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """Exit without tearing the interpreter down.

    Once a command has printed its answer, freeing torch's, MLflow's and pandas' objects
    one by one takes another ~2 s ("Cold commands" in docs/benchmarks.md) that the
    operating system does at once. What a normal exit does before that teardown still
    happens, in the interpreter's order: threading's exit hooks (a concurrent.futures
    pool's threads are told to stop) and a join of the other non-daemon threads, the
    atexit handlers (logs flushed, embedded servers this process started stopped), and
    a flush of stdout and stderr, whose failure exits 120 as CPython's does. What is
    skipped is objects' ``__del__``: the commands close the files they write, MLflow's
    store commits each change, and the operating system closes sockets and descriptors.
    """
    # Private hooks, the ones the interpreter's own exit calls; where a Python lacks
    # them, a normal exit.
    shutdown_threads = getattr(threading, "_shutdown", None)
    run_atexit = getattr(atexit, "_run_exitfuncs", None)
    if shutdown_threads is None or run_atexit is None:
        raise SystemExit(code)
    shutdown_threads()
    run_atexit()
    stdout_flushed = _flushed(sys.stdout)
    # stderr is flushed even when stdout was not: it may say why the command failed.
    if not (_flushed(sys.stderr) and stdout_flushed):
        code = EXIT_FLUSH_FAILED
    os._exit(code)


def _flushed(stream: Any) -> bool:
    """Whether ``stream`` holds nothing unwritten (a closed or missing one holds nothing)."""
    if stream is None or stream.closed:
        return True
    try:
        stream.flush()
    except OSError:  # e.g. a reader that went away: `forge dlq list | head -1`
        return False
    return True


def _run_reporting_errors(args: argparse.Namespace) -> int:
    # Here, not at the top: structlog and rich are not worth importing for --help.
    from forge.observability.logging import configure_logging

    try:
        settings = Settings.from_env()
        if args.command not in _LONG_RUNNING and "FORGE_LOG_LEVEL" not in os.environ:
            # One-shot commands print results; their progress chatter is noise.
            settings = settings.replace(log_level="WARNING")
        # Logs go to stderr so that stdout carries only the command's output.
        configure_logging(settings)
        command: Command = args.run
        return command(args, settings)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_went_away()
    except Exception as exc:
        message = describe_error(exc)
        if message is None:
            raise
        sys.stderr.write(f"forge: error: {message}\n")
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR


def _reader_went_away() -> int:
    """The reader of stdout closed it (``forge dlq list | head -1``): not an error of
    the command's. What is still buffered cannot be written: point stdout at /dev/null
    so that the flush at exit does not fail again. 141 is a shell's code for SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


# redis error classes a user can act on, most specific first, and how each is introduced.
_REDIS_ERROR_PREFIXES = (
    ("AuthenticationError", "Redis refused the credentials"),
    ("ConnectionError", "cannot reach Redis"),
    ("RedisError", "Redis error"),
)


def describe_error(exc: Exception) -> str | None:
    """The one line a user sees for an error they can act on; None for a bug."""
    from forge.observability.logging import redact_text

    if isinstance(exc, ForgeError):
        return str(exc)
    text = redact_text(str(exc).splitlines()[0] if str(exc) else "")
    # The clients are looked up, not imported: a library this process never loaded
    # raised nothing, and importing redis and psycopg would cost every command ~0.2 s.
    redis: Any = sys.modules.get("redis")
    if redis is not None:
        for name, prefix in _REDIS_ERROR_PREFIXES:
            if isinstance(exc, getattr(redis, name)):
                return f"{prefix}: {text}"
    postgres: Any = sys.modules.get("psycopg")
    if postgres is not None and isinstance(exc, postgres.Error):
        return _describe_postgres_error(exc, text)
    if isinstance(exc, OSError | msgspec.DecodeError | ValueError):
        return f"{type(exc).__name__}: {text}"
    return None


def _describe_postgres_error(exc: psycopg.Error, text: str) -> str | None:
    import psycopg

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


if __name__ == "__main__":
    entrypoint()
