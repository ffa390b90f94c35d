"""Collection names and the SQL identifiers derived from them.

Names are validated against the event contract's ``Name`` pattern, and every
identifier built from them is still quoted with ``psycopg.sql.Identifier``.
"""

from __future__ import annotations

import hashlib
import re
from typing import get_args

import msgspec

from forge.errors import InvalidEvent
from forge.events import Name

TABLE_PREFIX = "coll_"
# Short enough that "<table>_embedding_hnsw" stays within PostgreSQL's 63-byte limit
# (longer identifiers are silently truncated, which could make two names collide).
_MAX_PLAIN_NAME = 40
_SANITISED_PART = 30
_HASH_CHARS = 10
# "coll_" + 24 + "_" + 8 + "_v" + up to 6 digits + "_embedding_hnsw" <= 63 bytes.
_VERSIONED_PART = 24
_VERSION_HASH_CHARS = 8
_PLAIN = re.compile(r"[a-z_][a-z0-9_]*")
# The contract's pattern ends in "$", which also matches before a trailing newline;
# full-matching it here closes that gap.
_NAME_PATTERN = re.compile(get_args(Name)[1].pattern)
_UNSAFE = re.compile(r"[^a-z0-9_]")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid collection name, else raise ``InvalidEvent``."""
    try:
        msgspec.convert(name, Name)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"invalid collection name {name!r}: {exc}") from None
    if not _NAME_PATTERN.fullmatch(name):
        raise InvalidEvent(f"invalid collection name {name!r}: {_NAME_PATTERN.pattern}")
    return name


def table_name(name: str) -> str:
    """The table holding collection ``name``; distinct names give distinct tables.

    Plain lower-case names map to ``coll_<name>``. Others (upper case, '-', long)
    get a sanitised prefix plus a hash of the exact name, so ``a-b``, ``a_b`` and
    ``A_b`` never share a table.
    """
    validate_name(name)
    if len(name) <= _MAX_PLAIN_NAME and _PLAIN.fullmatch(name):
        return f"{TABLE_PREFIX}{name}"
    sanitised = _UNSAFE.sub("_", name.lower())[:_SANITISED_PART]
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_CHARS]
    return f"{TABLE_PREFIX}{sanitised}_{digest}"


def version_table_name(name: str, version: int) -> str:
    """The table holding version ``version`` of collection ``name``: version 1 is the
    collection's first table (``table_name``); later ones carry the version and a hash
    of the exact name, kept short enough for the index name's 63 bytes."""
    if version == 1:
        return table_name(name)
    sanitised = _UNSAFE.sub("_", name.lower())[:_VERSIONED_PART]
    digest = hashlib.sha256(name.encode()).hexdigest()[:_VERSION_HASH_CHARS]
    return f"{TABLE_PREFIX}{sanitised}_{digest}_v{version}"


INDEX_SUFFIX = "_embedding_hnsw"


def index_name(table: str) -> str:
    return f"{table}{INDEX_SUFFIX}"
