"""Semantic search over a collection: the Python API behind ``forge search``."""

from __future__ import annotations

from collections.abc import Mapping

from forge.embedding.service import EmbeddingService
from forge.errors import ConfigError
from forge.vectorstore import Hit, VectorStore


class Searcher:
    """Embeds a query with the collection's own model and asks pgvector for neighbours."""

    def __init__(self, store: VectorStore, embedding: EmbeddingService) -> None:
        self.store = store
        self.embedding = embedding

    def search(
        self,
        collection: str,
        text: str,
        k: int = 10,
        filters: Mapping[str, str] | None = None,
    ) -> list[Hit]:
        """The ``k`` records most similar to ``text``, best first (score: cosine)."""
        if self.store.collection(collection) is None:
            raise ConfigError(f"no collection {collection!r}")
        model = self.embedding.model_for(self.store, collection, None)
        embedder = self.embedding.embedder(model)
        vector = self.embedding.encode(embedder, [text]).vectors[0]
        return self.store.search(collection, vector, k, filters)


def parse_filters(expressions: list[str]) -> dict[str, str]:
    """``["lang=en", "tier=gold"]`` -> metadata equality filters."""
    filters: dict[str, str] = {}
    for expr in expressions:
        key, sep, value = expr.partition("=")
        if not sep or not key:
            raise ConfigError(f"bad filter {expr!r}: use KEY=VALUE")
        filters[key] = value
    return filters
