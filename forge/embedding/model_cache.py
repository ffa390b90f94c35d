"""An in-process LRU cache of loaded models, bounded by bytes rather than by count.

Models differ in size by orders of magnitude (a 90 MB sentence encoder next to a
4 KB logistic regression), so a count bound either wastes memory or evicts too much.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import structlog

from forge.settings import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class _Entry:
    value: object
    size_bytes: int


class ModelCache:
    """Thread-safe byte-bounded LRU. Values of any type share one budget."""

    def __init__(self, max_size_bytes: int) -> None:
        if max_size_bytes < 0:
            raise ValueError(f"max_size_bytes must be >= 0, got {max_size_bytes}")
        self.max_size_bytes = max_size_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._size_bytes = 0
        self._lock = threading.Lock()
        # One lock per key being loaded, so concurrent callers of one key load it once
        # while hits and loads of other keys proceed.
        self._loading: dict[str, threading.Lock] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelCache:
        return cls(settings.model_cache_size_bytes)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._size_bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    def get_or_load(self, key: str, loader: Callable[[], T], size_of: Callable[[T], int]) -> T:
        """Return the cached value for ``key``, loading (and caching) it on a miss."""
        hit, value = self._get(key)
        if hit:
            return cast(T, value)
        key_lock = self._key_lock(key)
        with key_lock:
            hit, value = self._get(key)
            if hit:
                return cast(T, value)
            try:
                loaded = loader()
                self._put(key, loaded, size_of(loaded))
            finally:
                self._release_key_lock(key, key_lock)
            return loaded

    def evict(self, key: str) -> bool:
        """Drop ``key``; True if it was cached."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self._size_bytes -= entry.size_bytes
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._size_bytes = 0

    def _get(self, key: str) -> tuple[bool, object]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False, None
            self._entries.move_to_end(key)
            return True, entry.value

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._loading.setdefault(key, threading.Lock())

    def _release_key_lock(self, key: str, key_lock: threading.Lock) -> None:
        with self._lock:
            if self._loading.get(key) is key_lock:
                del self._loading[key]

    def _put(self, key: str, value: object, size_bytes: int) -> None:
        if size_bytes > self.max_size_bytes:
            log.warning(
                "model larger than the whole cache; not caching it",
                key=key,
                size_bytes=size_bytes,
                max_size_bytes=self.max_size_bytes,
            )
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._size_bytes -= old.size_bytes
            evicted = self._evict_for(size_bytes)
            self._entries[key] = _Entry(value, size_bytes)
            self._size_bytes += size_bytes
        for name, entry in evicted:
            log.info("evicted model from cache", key=name, size_bytes=entry.size_bytes)

    def _evict_for(self, size_bytes: int) -> list[tuple[str, _Entry]]:
        """Pop least recently used entries until ``size_bytes`` more fits (lock held)."""
        evicted: list[tuple[str, _Entry]] = []
        while self._entries and self._size_bytes + size_bytes > self.max_size_bytes:
            name, entry = self._entries.popitem(last=False)
            self._size_bytes -= entry.size_bytes
            evicted.append((name, entry))
        return evicted
