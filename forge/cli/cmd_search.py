"""``forge search``: nearest records of a collection to a text; asked of a running
``forge serve`` when one answers at the configured address (same output)."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from forge.cli.output import print_json, print_table, shorten
from forge.embedding.search import Searcher, parse_filters
from forge.embedding.service import EmbeddingService
from forge.servers.embedded_postgres import resolve_postgres_url
from forge.serving.client import ServerClient
from forge.serving.limits import MAX_K
from forge.settings import Settings
from forge.vectorstore import VectorStore
from forge.vectorstore.naming import validate_name


def run_search(args: argparse.Namespace, settings: Settings) -> int:
    # Arguments first: a bad name must not start a server or migrate a database.
    validate_name(args.collection)
    filters = parse_filters(args.filter)
    # A -k the API does not take is answered here, as it always was.
    server = ServerClient.find(settings) if 1 <= args.k <= MAX_K else None
    if server is not None:
        hits = server.search(args.collection, args.text, args.k, filters)
    else:
        hits = _local(settings, args.collection, args.text, args.k, filters)
    if args.json:
        print_json(hits)
        return 0
    rows = [[f"{h['score']:.4f}", h["id"], shorten(h["text"] or "", 70)] for h in hits]
    print_table(["score", "id", "text"], rows)
    return 0


def _local(
    settings: Settings, collection: str, text: str, k: int, filters: dict[str, str]
) -> list[dict[str, Any]]:
    """The hits as the server sends them: plain objects, fields in the same order."""
    url, embedded = resolve_postgres_url(settings)
    try:
        with VectorStore.from_settings(url, settings) as store:
            # The query embedding is not worth caching: no Redis needed to search.
            searcher = Searcher(store, EmbeddingService.from_settings(settings, None))
            hits = searcher.search(collection, text, k, filters)
    finally:
        if embedded is not None:
            embedded.stop()
    return list(msgspec.to_builtins(hits))
