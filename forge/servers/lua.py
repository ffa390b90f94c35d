"""Lua scripts Forge runs on Redis, on one server or a cluster alike."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import NoScriptError


class Script:
    """A script run by its SHA (EVALSHA), sent whole (EVAL) when the server lacks it:
    after a restart, or on a cluster node that never ran it.

    Not redis-py's ``register_script``: on a cluster it answers NOSCRIPT by loading the
    script on every master, which fails while any master is down, even for keys whose
    master is up. EVAL goes to the keys' master only, and caches the script there.
    """

    def __init__(self, client: redis.Redis, source: str) -> None:
        self._client = client
        self._source = source
        self._sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def __call__(self, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        try:
            return self._client.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:
            return self._client.eval(self._source, len(keys), *keys, *args)

    def queue(self, pipe: Any, keys: Sequence[Any], args: Sequence[Any] = ()) -> None:
        """Queue the script on a pipeline. Sent whole (EVAL): a NOSCRIPT reply inside
        a pipeline could not be answered there; the server still compiles it once."""
        # execute_command: a cluster pipeline blocks its ``eval`` method, not the command.
        pipe.execute_command("EVAL", self._source, len(keys), *keys, *args)
