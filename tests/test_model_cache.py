from __future__ import annotations

import threading
import time

import pytest

from forge.embedding.model_cache import ModelCache
from forge.settings import Settings


def _size(value: bytes) -> int:
    return len(value)


def _load(cache: ModelCache, key: str, size: int) -> bytes:
    return cache.get_or_load(key, lambda: bytes(size), _size)


def test_evicts_least_recently_used_until_it_fits() -> None:
    cache = ModelCache(max_size_bytes=100)
    _load(cache, "a", 40)
    _load(cache, "b", 40)
    _load(cache, "a", 40)  # a is now the most recently used
    _load(cache, "c", 30)  # needs 10 more bytes: b goes, a stays
    assert cache.keys() == ["a", "c"]
    assert cache.size_bytes == 70
    _load(cache, "d", 100)  # needs everything
    assert cache.keys() == ["d"]
    assert cache.size_bytes == 100


def test_bound_is_bytes_not_count() -> None:
    cache = ModelCache(max_size_bytes=1000)
    for i in range(100):
        _load(cache, f"small-{i}", 10)
    assert len(cache) == 100
    _load(cache, "big", 500)
    assert cache.size_bytes <= 1000
    assert len(cache) == 51


def test_hit_does_not_reload() -> None:
    cache = ModelCache(max_size_bytes=100)
    calls = []

    def loader() -> bytes:
        calls.append(1)
        return bytes(10)

    first = cache.get_or_load("m", loader, _size)
    assert cache.get_or_load("m", loader, _size) is first
    assert len(calls) == 1


def test_oversized_item_is_returned_but_not_kept() -> None:
    cache = ModelCache(max_size_bytes=100)
    _load(cache, "a", 50)
    value = _load(cache, "huge", 101)
    assert len(value) == 101
    assert "huge" not in cache
    assert cache.keys() == ["a"]  # nothing was evicted for it


def test_failed_load_is_not_cached() -> None:
    cache = ModelCache(max_size_bytes=100)

    def broken() -> bytes:
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        cache.get_or_load("m", broken, _size)
    assert "m" not in cache
    assert len(_load(cache, "m", 5)) == 5


def test_concurrent_callers_load_once() -> None:
    cache = ModelCache(max_size_bytes=100)
    calls = []
    barrier = threading.Barrier(8)

    def slow_loader() -> bytes:
        calls.append(1)
        time.sleep(0.05)
        return bytes(10)

    results: list[bytes] = []

    def worker() -> None:
        barrier.wait()
        results.append(cache.get_or_load("m", slow_loader, _size))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len({id(r) for r in results}) == 1


def test_generic_values_and_settings() -> None:
    cache = ModelCache.from_settings(Settings(model_cache_size_bytes=1_000))
    assert cache.max_size_bytes == 1_000
    model = cache.get_or_load("clf", lambda: {"weights": [1.0, 2.0]}, lambda _: 16)
    assert model == {"weights": [1.0, 2.0]}
    assert cache.evict("clf")
    assert not cache.evict("clf")
    assert cache.size_bytes == 0
