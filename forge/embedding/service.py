"""Embedding for workers and commands: models from the byte-bounded model cache,
vectors through the Redis embedding cache (one-shot commands go without), and the
model chosen per collection.

Shared by the new-data handler and by search, so both embed a collection's texts with
the same model, and by ``forge predict``. A worker's training service keeps trained
models in the same model cache: one byte budget for both.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from forge.embedding.cache import EmbeddingCache, Encoded, encode_cached
from forge.embedding.model import Embedder
from forge.embedding.model_cache import ModelCache
from forge.errors import InvalidEvent
from forge.observability.metrics import Metrics
from forge.settings import Settings
from forge.vectorstore import VectorStore


class EmbeddingService:
    def __init__(
        self,
        settings: Settings,
        models: ModelCache,
        cache: EmbeddingCache | None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.cache = cache
        self.metrics = metrics

    @classmethod
    def from_settings(
        cls, settings: Settings, client: redis.Redis | None, metrics: Metrics | None = None
    ) -> EmbeddingService:
        cache = EmbeddingCache.from_settings(client, settings) if client is not None else None
        return cls(settings, ModelCache.from_settings(settings), cache, metrics)

    def embedder(self, name: str | None = None) -> Embedder:
        """The loaded model ``name`` (default: the configured one), loaded at most once.

        A model an event asked for that cannot be loaded is that event's fault
        (``InvalidEvent``: dead-lettered with the reason, not retried); the configured
        default failing to load is an operator's problem and propagates as is.
        """
        model = name or self.settings.embedding_model
        try:
            return self.models.get_or_load(
                f"embedder:{model}",
                lambda: Embedder.from_settings(self.settings, model),
                lambda e: e.size_bytes,
            )
        except (OSError, ValueError) as exc:
            if model == self.settings.embedding_model:
                raise
            raise InvalidEvent(f"cannot load embedding model {model!r}: {exc}") from exc

    def model_for(self, store: VectorStore, collection: str, requested: str | None) -> str:
        """The collection's model: the one it was created with, else the requested or
        configured one. Mixing models in one collection would make scores meaningless."""
        existing = store.collection(collection)
        if existing is not None and existing.model:
            return existing.model
        return requested or self.settings.embedding_model

    def encode(self, embedder: Embedder, texts: Sequence[str]) -> Encoded:
        """Embed ``texts``, computing only distinct texts the cache does not hold."""
        encoded = encode_cached(embedder, self.cache, texts, self.settings.max_batch_size)
        hits = sum(encoded.cached)
        self._count(embedder.name, hits=hits, misses=len(texts) - hits)
        return encoded

    def _count(self, model: str, *, hits: int, misses: int) -> None:
        if self.metrics is None:
            return
        if hits:
            self.metrics.embedding_cache_hits_total.labels(model=model).inc(hits)
        if misses:
            self.metrics.embedding_cache_misses_total.labels(model=model).inc(misses)
