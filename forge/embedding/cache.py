"""A Redis cache of embeddings keyed by model identity and the text's SHA-256.

The cache is only an optimisation: when Redis misbehaves, reads behave as misses and
writes are skipped, with a (rate-limited) warning. Embedding never fails because of it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import redis
import redis.exceptions
import structlog
from redis.cluster import RedisCluster

from forge.keys import Keys
from forge.settings import Settings

log = structlog.get_logger(__name__)

Vector = npt.NDArray[np.float32]
Counter = Callable[[int], None]

_FLOAT32_BYTES = 4


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _ignore(_: int) -> None:
    return None


class EmbeddingCache:
    """Batch get/put of float32 vectors stored as raw little-endian bytes with a TTL."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        ttl_s: int,
        *,
        on_hit: Counter | None = None,
        on_miss: Counter | None = None,
        warn_interval_s: float = 60.0,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._ttl_s = ttl_s
        # Counters are plain callables so the metrics module stays decoupled.
        self._on_hit = on_hit or _ignore
        self._on_miss = on_miss or _ignore
        self._warn_interval_s = warn_interval_s
        self._last_warning_at = -float("inf")

    @classmethod
    def from_settings(
        cls,
        client: redis.Redis,
        settings: Settings,
        *,
        on_hit: Counter | None = None,
        on_miss: Counter | None = None,
    ) -> EmbeddingCache:
        keys = Keys.from_settings(settings)
        return cls(client, keys, settings.cache_ttl_s, on_hit=on_hit, on_miss=on_miss)

    def key(self, model_id: str, text: str) -> str:
        return self._keys.embedding_cache(model_id, content_hash(text))

    def keys_for(self, model_id: str, texts: Sequence[str]) -> list[str]:
        """The cache keys of ``texts``, in order."""
        return [self._keys.embedding_cache(model_id, content_hash(text)) for text in texts]

    def get_many(
        self, model_id: str, texts: Sequence[str], dimension: int | None = None
    ) -> list[Vector | None]:
        """Cached vectors for ``texts`` in order; ``None`` where missing or unusable."""
        return self.get_keys(self.keys_for(model_id, texts), dimension)

    def get_keys(self, keys: Sequence[str], dimension: int | None = None) -> list[Vector | None]:
        """``get_many`` with the keys already built (``keys_for``)."""
        if not keys:
            return []
        try:
            raw = self._mget(keys)
        except (redis.exceptions.RedisError, OSError) as exc:
            self._warn("get", exc)
            raw = [None] * len(keys)
        vectors = [_decode(value, dimension) for value in raw]
        hits = sum(vector is not None for vector in vectors)
        self._on_hit(hits)
        self._on_miss(len(vectors) - hits)
        return vectors

    def _mget(self, keys: Sequence[str]) -> list[Any]:
        if isinstance(self._redis, RedisCluster):
            # The keys hash to slots all over the cluster: one MGET per slot.
            found: list[Any] = self._redis.mget_nonatomic(keys)
            return found
        values: Any = self._redis.mget(keys)
        return list(values)

    def put_many(self, model_id: str, texts: Sequence[str], vectors: Vector) -> None:
        """Store one vector per text (rows of ``vectors``), each with the TTL."""
        if len(texts) != len(vectors):
            raise ValueError(f"{len(texts)} texts but {len(vectors)} vectors")
        self.put_keys(self.keys_for(model_id, texts), vectors)

    def put_keys(self, keys: Sequence[str], vectors: Vector) -> None:
        """``put_many`` with the keys already built (``keys_for``)."""
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys but {len(vectors)} vectors")
        if not keys:
            return
        rows = np.ascontiguousarray(vectors, dtype="<f4")
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                # SET key value EX ttl, as ``pipe.set(..., ex=ttl)`` sends it, without
                # redis-py's per-call option checks.
                queue: Callable[..., Any] = pipe.execute_command
                for key, row in zip(keys, rows, strict=True):
                    queue("SET", key, row.tobytes(), "EX", self._ttl_s)
                pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            self._warn("put", exc)

    def _warn(self, operation: str, exc: BaseException) -> None:
        # During an outage every batch fails; one warning a minute is enough.
        now = time.monotonic()
        if now - self._last_warning_at < self._warn_interval_s:
            log.debug("embedding cache unavailable", operation=operation, error=str(exc))
            return
        self._last_warning_at = now
        log.warning(
            "embedding cache unavailable; embedding without it",
            operation=operation,
            error=f"{type(exc).__name__}: {exc}",
        )


def _decode(value: bytes | str | None, dimension: int | None) -> Vector | None:
    if not isinstance(value, bytes) or len(value) % _FLOAT32_BYTES:
        return None
    if dimension is not None and len(value) != dimension * _FLOAT32_BYTES:
        return None
    return np.frombuffer(value, dtype="<f4").astype(np.float32, copy=False)


class TextEncoder(Protocol):
    """What ``encode_cached`` needs from an embedder."""

    @property
    def cache_id(self) -> str: ...

    @property
    def dimension(self) -> int: ...

    def encode(self, texts: list[str], batch_size: int) -> Vector: ...


@dataclass(frozen=True, slots=True)
class Encoded:
    """Vectors in input order, and which rows came from the cache."""

    vectors: Vector
    cached: list[bool]


def encode_cached(
    encoder: TextEncoder, cache: EmbeddingCache | None, texts: Sequence[str], batch_size: int
) -> Encoded:
    """Embed ``texts`` (one row each, in order), computing only uncached distinct texts."""
    unique = list(dict.fromkeys(texts))
    keys: list[str] = []
    if cache is None:
        found: list[Vector | None] = [None] * len(unique)
    else:
        keys = cache.keys_for(encoder.cache_id, unique)  # hashed once, for get and put
        found = cache.get_keys(keys, encoder.dimension)
    misses = [i for i, vector in enumerate(found) if vector is None]
    missing = [unique[i] for i in misses]
    computed = encoder.encode(missing, batch_size)
    if cache is not None and missing:
        cache.put_keys([keys[i] for i in misses], computed)
    if missing and len(missing) == len(texts):  # the common case: all distinct, none cached
        vectors = np.asarray(computed, dtype=np.float32)
        if vectors.shape == (len(texts), encoder.dimension):
            return Encoded(vectors, [False] * len(texts))
    fresh = dict(zip(missing, computed, strict=True))
    by_text = {
        text: fresh[text] if vector is None else vector
        for text, vector in zip(unique, found, strict=True)
    }
    out = np.empty((len(texts), encoder.dimension), dtype=np.float32)
    for row, text in enumerate(texts):
        out[row] = by_text[text]
    return Encoded(out, [text not in fresh for text in texts])
