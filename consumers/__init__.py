"""Forge's event handlers. ``register`` is the ``forge.consumers`` entry point.

The engine (``forge``) never imports this package: ``forge worker`` finds
``register`` through the entry point (or ``--consumers module:function``) and calls
it with a registry and the worker's context.
"""

from __future__ import annotations

from consumers.new_data import NewDataHandler
from forge.context import Context
from forge.embedded_postgres import resolve_postgres_url
from forge.embedding import EmbeddingService
from forge.events import NewData
from forge.registry import HandlerSpec, Registry
from forge.vectorstore import VectorStore


def register(registry: Registry, ctx: Context) -> None:
    """Register every Forge handler."""
    embedding = EmbeddingService.from_settings(ctx.settings, ctx.redis, ctx.metrics)
    handler = NewDataHandler(ctx.settings, lambda: open_store(ctx), embedding)
    registry.register(HandlerSpec("new-data", NewData, handler, name="embed"))


def open_store(ctx: Context) -> VectorStore:
    """Connect to PostgreSQL (embedded when ``POSTGRES_URL`` is unset) and migrate."""
    url, embedded = resolve_postgres_url(ctx.settings)
    if embedded is not None:
        ctx.on_close(embedded.stop)
    store = VectorStore(url)
    store.open()
    ctx.on_close(store.close)
    return store
