"""Parsers of setting values from the environment (sizes, booleans) and the redaction
of secrets in connection URLs, for ``forge.settings`` and whatever prints a URL."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

from forge.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(value: str) -> int:
    """Parse a human byte size such as ``2GB``, ``512MiB`` or ``1000`` into bytes."""
    match = _SIZE_RE.match(value)
    if not match:
        raise ConfigError(f"not a byte size: {value!r} (examples: 2GB, 512MiB, 1000000)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    binary = "i" in unit
    prefix = unit[:1] if unit[:1] in "kmgt" else ""
    factor = 1024 ** "kmgt".index(prefix) * 1024 if binary and prefix else _SIZE_UNITS[prefix]
    return int(number * factor)


# Query parameters that carry secrets: redis-py and libpq both take ``?password=``.
# libpq's keyword form (``host=db password='a b'``) too, quoted values included.
SECRET_PARAM_RE = re.compile(
    r"(?i)(^|[?&;\s])(password|passwd|pwd|sslpassword|secret|token|access_token|api_?key)="
    r"('(?:[^'\\]|\\.)*'|[^&;#\s'\"<>]*)"
)


_USERINFO_RE = re.compile(r"^(?P<scheme>[^:/]*://)[^/?#]*@")


def redact_url(url: str | None) -> str | None:
    """Return ``url`` with any password replaced by ``***`` (safe to log or print):
    the userinfo's and those of secret-bearing query parameters."""
    if not url:
        return url
    if "://" not in url:  # a libpq keyword string, or no URL at all
        return SECRET_PARAM_RE.sub(r"\1\2=***", url)
    try:
        parts = urlsplit(url)
    except ValueError:  # a broken IPv6 literal: blank all of the userinfo, and the query
        return _USERINFO_RE.sub(r"\g<scheme>***@", url).split("?", 1)[0]
    query = SECRET_PARAM_RE.sub(r"\1\2=***", parts.query)
    netloc = parts.netloc
    if parts.password is not None:
        # The host part as written: ``hostname``/``port`` would drop IPv6 brackets
        # and raise on a bad port.
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def strip_text(value: str) -> str:
    return value.strip()


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(value: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off``, any case."""
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(f"not a boolean: {value!r} (use one of {', '.join(_TRUE + _FALSE)})")
