"""Structured logging for Forge, configured once from ``Settings``.

Every module gets its logger with ``structlog.get_logger(__name__)``. Records from
third-party libraries (redis, mlflow, psycopg...) go through the standard ``logging``
module; they are routed through the same processors, so they share the format and,
above all, the secret redaction.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from forge.errors import ConfigError
from forge.settings import Settings
from forge.settings_values import SECRET_PARAM_RE, redact_url

# A URL carrying credentials: ``scheme://user:password@host...``. Deliberately loose
# (any non-space run after the scheme) so that passwords with odd characters are caught.
_CREDENTIAL_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@'\"<>]*:[^\s'\"<>]*@[^\s'\"<>]*")
# Fallback when ``redact_url`` cannot parse a match: blank everything between the
# first ':' after the scheme and the last '@'.
_USERINFO_PASSWORD_RE = re.compile(r"^(?P<head>[^:]+://[^:@]*):.*@(?P<tail>[^@]*)$")
_MAX_REDACT_DEPTH = 4


class _ForgeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler Forge installed, so reconfiguring replaces it instead of adding."""


def configure_logging(settings: Settings, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to ``stream`` (stderr by default).

    JSON lines when ``settings.log_format`` is ``json``, or ``auto`` and the stream is
    not a terminal; a readable console format otherwise. Safe to call again: the new
    configuration replaces the old one.
    """
    out = stream if stream is not None else sys.stderr
    level = _parse_level(settings.log_level)
    as_json = settings.log_format == "json" or (settings.log_format == "auto" and not _is_tty(out))
    shared = _shared_processors()
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: loggers created before a reconfiguration must follow it.
        cache_logger_on_first_use=False,
    )
    handler = _ForgeHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _renderer(as_json, colors=_is_tty(out)),
            ],
        )
    )
    # The level first, on the handler too: a thread logging while the handlers are
    # swapped must not pass a record of the old level to the new stream.
    handler.setLevel(level)
    root = logging.getLogger()
    root.setLevel(level)
    for old in [h for h in root.handlers if isinstance(h, _ForgeHandler | _ForgeFileHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    if settings.log_dir is not None:
        root.addHandler(_file_handler(settings.log_dir, shared))


class _ForgeFileHandler(logging.handlers.RotatingFileHandler):
    """Forge's log file, told apart from other handlers like ``_ForgeHandler``."""


def _file_handler(log_dir: Path, shared: list[Processor]) -> logging.Handler:
    """JSON lines in ``log_dir/forge.log`` (the container's /var/log/datapunk/forge),
    rotated at 50 MB so a long-running worker cannot fill its volume."""
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = _ForgeFileHandler(
        log_dir / "forge.log", maxBytes=50 * 2**20, backupCount=5, encoding="utf-8"
    )
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _renderer(True, colors=False),
            ],
        )
    )
    return handler


def _shared_processors() -> list[Processor]:
    # Exceptions are formatted to text *before* redaction so that a password inside an
    # exception message is caught too; that costs the pretty console tracebacks.
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact_secrets,
    ]


def _renderer(as_json: bool, *, colors: bool) -> Processor:
    if as_json:
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(
        colors=colors, exception_formatter=structlog.dev.plain_traceback, sort_keys=False
    )


def _parse_level(name: str) -> int:
    levels = logging.getLevelNamesMapping()
    level = levels.get(name.strip().upper())
    if level is None:
        known = ", ".join(sorted(k for k in levels if k != "NOTSET"))
        raise ConfigError(f"unknown log level {name!r} (one of: {known})")
    return level


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or the stream is closed
        return False


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: hide passwords of credential-bearing URLs in any value."""
    return {key: _redact_value(value, 0) for key, value in event_dict.items()}


def redact_text(text: str) -> str:
    """Replace the password of every ``scheme://user:pass@host`` URL inside ``text``,
    and the value of every ``password=``-like query parameter."""
    if "=" in text:
        text = SECRET_PARAM_RE.sub(r"\1\2=***", text)
    if "://" not in text:
        return text
    return _CREDENTIAL_URL_RE.sub(_redact_match, text)


def _redact_match(match: re.Match[str]) -> str:
    url = match.group(0)
    try:
        return redact_url(url) or url
    except ValueError:  # unparsable (bad port, broken IPv6 literal): redact by pattern
        return _USERINFO_PASSWORD_RE.sub(r"\g<head>:***@\g<tail>", url)


def _redact_value(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if depth >= _MAX_REDACT_DEPTH:
        return value
    if isinstance(value, BaseException):
        # Rendered later with str()/repr(), which could carry a connection string.
        return redact_text(f"{type(value).__name__}: {value}")
    return _redact_container(value, depth + 1)


def _redact_container(value: Any, depth: int) -> Any:
    if isinstance(value, Mapping):
        return {k: _redact_value(v, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v, depth) for v in value]
    if isinstance(value, tuple):
        return tuple(_redact_value(v, depth) for v in value)
    return value
