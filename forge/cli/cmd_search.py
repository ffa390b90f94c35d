"""``forge search``: nearest records of a collection to a text."""

from __future__ import annotations

import argparse

from forge.cli.output import print_json, print_table, shorten
from forge.embedding.search import Searcher, parse_filters
from forge.embedding.service import EmbeddingService
from forge.servers.embedded_postgres import resolve_postgres_url
from forge.settings import Settings
from forge.vectorstore import VectorStore
from forge.vectorstore.naming import validate_name


def run_search(args: argparse.Namespace, settings: Settings) -> int:
    # Arguments first: a bad name must not start a server or migrate a database.
    validate_name(args.collection)
    filters = parse_filters(args.filter)
    url, embedded = resolve_postgres_url(settings)
    try:
        with VectorStore.from_settings(url, settings) as store:
            # The query embedding is not worth caching: no Redis needed to search.
            searcher = Searcher(store, EmbeddingService.from_settings(settings, None))
            hits = searcher.search(args.collection, args.text, args.k, filters)
    finally:
        if embedded is not None:
            embedded.stop()
    if args.json:
        print_json(hits)
        return 0
    rows = [[f"{h.score:.4f}", h.id, shorten(h.text or "", 70)] for h in hits]
    print_table(["score", "id", "text"], rows)
    return 0
