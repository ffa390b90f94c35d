"""Collection search for the HTTP API: ``forge.embedding.search`` over a vector store
opened on first use (a server that only predicts never starts PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from forge.embedding.search import Searcher
from forge.embedding.service import EmbeddingService
from forge.servers.endpoints import open_vector_store
from forge.settings import Settings
from forge.vectorstore import Hit, VectorStore
from forge.vectorstore.naming import validate_name


class LazySearch:
    def __init__(self, settings: Settings, embedding: EmbeddingService) -> None:
        self.settings = settings
        self.embedding = embedding
        self._store: VectorStore | None = None
        self._closers: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def search(self, collection: str, text: str, k: int, filters: Mapping[str, str]) -> list[Hit]:
        """``InvalidEvent`` for a bad name, ``ConfigError`` for a missing collection."""
        validate_name(collection)
        return Searcher(self._open(), self.embedding).search(collection, text, k, filters)

    def _open(self) -> VectorStore:
        with self._lock:
            if self._store is None:
                self._store = open_vector_store(self.settings, self._closers.append)
            return self._store

    def close(self) -> None:
        with self._lock:
            for close in reversed(self._closers):
                close()
            self._closers.clear()
            self._store = None
