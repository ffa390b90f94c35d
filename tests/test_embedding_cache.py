"""The embedding cache: plain MGET and SET EX, so an in-process fakeredis server (one
per test) stands in for Redis; an unreachable Redis is a real client on a dead port."""

from __future__ import annotations

import fakeredis
import numpy as np
import pytest
import redis

from forge.embedding.cache import EmbeddingCache, content_hash, encode_cached
from forge.keys import Keys
from forge.settings import Settings
from tests.support.redis_helpers import new_prefix

MODEL = "test-model@0123456789abcdef"
UNREACHABLE = "redis://127.0.0.1:1/0"


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    """A client of a server of its own (FakeRedis clients otherwise share one)."""
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def cache_prefix() -> str:
    return new_prefix()


class Counts:
    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0

    def hit(self, n: int) -> None:
        self.hits += n

    def miss(self, n: int) -> None:
        self.misses += n


def _cache(prefix: str, counts: Counts, client: redis.Redis) -> EmbeddingCache:
    return EmbeddingCache(client, Keys(prefix=prefix), 60, on_hit=counts.hit, on_miss=counts.miss)


def _unreachable() -> redis.Redis:
    return redis.Redis.from_url(UNREACHABLE)  # a dead port refuses at once


def _vectors(n: int, dim: int = 8) -> np.ndarray:
    rng = np.random.default_rng(n)
    return rng.standard_normal((n, dim)).astype(np.float32)


def test_round_trip_with_ttl_and_counters(cache_prefix: str, client: redis.Redis) -> None:
    counts = Counts()
    cache = _cache(cache_prefix, counts, client)
    texts = ["one", "two", "three"]
    vectors = _vectors(3)
    assert cache.get_many(MODEL, texts) == [None, None, None]
    cache.put_many(MODEL, texts, vectors)
    found = cache.get_many(MODEL, [*texts, "four"], dimension=8)
    for vector, expected in zip(found[:3], vectors, strict=True):
        assert vector is not None
        np.testing.assert_array_equal(vector, expected)
    assert found[3] is None
    assert (counts.hits, counts.misses) == (3, 4)

    key = Keys(prefix=cache_prefix).embedding_cache(MODEL, content_hash("one"))
    assert key == cache.key(MODEL, "one")
    assert client.get(key) == vectors[0].astype("<f4").tobytes()
    assert 0 < client.ttl(key) <= 60


def test_keys_separate_models(cache_prefix: str, client: redis.Redis) -> None:
    cache = _cache(cache_prefix, Counts(), client)
    cache.put_many(MODEL, ["text"], _vectors(1))
    assert cache.get_many("other-model@1", ["text"]) == [None]


def test_unusable_values_are_misses(cache_prefix: str, client: redis.Redis) -> None:
    cache = _cache(cache_prefix, Counts(), client)
    client.set(cache.key(MODEL, "odd"), b"12345")  # not whole float32s
    cache.put_many(MODEL, ["short"], _vectors(1, dim=4))
    assert cache.get_many(MODEL, ["odd", "short"], dimension=8) == [None, None]


def test_unreachable_redis_is_all_miss_and_no_op() -> None:
    counts = Counts()
    cache = _cache("forgetest:nowhere:", counts, _unreachable())
    assert cache.get_many(MODEL, ["a", "b"]) == [None, None]
    cache.put_many(MODEL, ["a"], _vectors(1))  # must not raise
    assert (counts.hits, counts.misses) == (0, 2)


class FakeEncoder:
    cache_id = MODEL
    dimension = 8

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        self.calls.append(list(texts))
        rows = [np.full(8, float(len(text)), dtype=np.float32) for text in texts]
        return np.stack(rows) if rows else np.zeros((0, 8), dtype=np.float32)


def test_encode_cached_computes_only_distinct_misses(
    cache_prefix: str, client: redis.Redis
) -> None:
    counts = Counts()
    cache = _cache(cache_prefix, counts, client)
    encoder = FakeEncoder()
    first_encoded = encode_cached(encoder, cache, ["a", "bb", "a"], batch_size=4)
    first = first_encoded.vectors
    assert first_encoded.cached == [False, False, False]
    assert encoder.calls == [["a", "bb"]]
    assert first.shape == (3, 8)
    np.testing.assert_array_equal(first[0], first[2])
    second_encoded = encode_cached(encoder, cache, ["bb", "ccc", "a"], batch_size=4)
    second = second_encoded.vectors
    assert second_encoded.cached == [True, False, True]
    assert encoder.calls[-1] == ["ccc"]
    np.testing.assert_array_equal(second[:, 0], [2.0, 3.0, 1.0])


def test_encode_cached_without_cache_or_redis() -> None:
    encoder = FakeEncoder()
    out = encode_cached(encoder, None, ["x", "yy"], batch_size=2).vectors
    np.testing.assert_array_equal(out[:, 0], [1.0, 2.0])
    broken = _cache("forgetest:nowhere:", Counts(), _unreachable())
    out = encode_cached(encoder, broken, ["x", "yy"], batch_size=2).vectors
    np.testing.assert_array_equal(out[:, 0], [1.0, 2.0])


def test_from_settings_uses_prefix_and_ttl(cache_prefix: str, client: redis.Redis) -> None:
    settings = Settings(stream_prefix=cache_prefix, cache_ttl_s=123)
    cache = EmbeddingCache.from_settings(client, settings)
    cache.put_many(MODEL, ["t"], _vectors(1))
    key = cache.key(MODEL, "t")
    assert key.startswith(f"{cache_prefix}emb:{MODEL}:")
    assert 100 < client.ttl(key) <= 123
