"""Benchmark: a collection's first load with the HNSW index built once, against live
index maintenance, and float32 (vector) against float16 (halfvec) storage.

    .venv/bin/python bench/first_load.py [--rows 20000] [--queries 200] [--batch 1000]
        [--index-workers 2] [--postgres-url URL] [--via-events [--event-records 10]]

Vectors: the packaged all-MiniLM-L6-v2's embeddings of distinct short sentences (as
``bench/hnsw_params.py`` makes them): ``--rows`` to store, ``--queries`` others to
search with. PostgreSQL: ``--postgres-url``, else an embedded server in a temporary
folder. Default HNSW parameters (m 16, ef_construction 64, ef_search 40).

* ``live index`` (the baseline): ``VectorStore.write_batch`` of ``--batch`` rows per
  call into a collection created with its index, as events would write it.
* ``deferred, vector`` and ``deferred, halfvec``: ``VectorStore.bulk_load`` (what
  ``forge collections load`` runs): the rows copied into a collection created without
  its index, then the index built once (``--index-workers`` parallel maintenance
  workers, ``maintenance_work_mem`` sized for the graph).

With ``--via-events``, the load goes through the new-data handler instead (the path a
producer's events take; ready vectors, so no model runs), in reads of
``FORGE_EMBED_PIPELINE_DEPTH`` x ``MAX_BATCH_SIZE`` events of ``--event-records``
records, the stream's backlog being the events not yet read:

* ``events, live index`` (the baseline): ``FORGE_BULK_LOAD_ROWS=0``, the collection
  created with its index.
* ``events, deferred``: ``FORGE_BULK_LOAD_ROWS`` (capped at ``--rows``): the collection
  created without its index, which the handler's keeper builds once the backlog is
  drained; the time runs until that index is built.

For each: rows/s over the whole load (index build included) and against the baseline,
recall@10 (the share of the exact 10 nearest rows, cosine over every stored vector,
that a search returns, averaged over the queries) and the size on disk (table, index
and TOAST).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from bench.hnsw_params import embed, exact_top, print_versions
from bench.write_path import batches, postgres_server
from consumers.new_data import NewDataHandler
from forge.embedding.model_cache import ModelCache
from forge.embedding.service import EmbeddingService
from forge.events import NewData, Record
from forge.runtime.handlers import Message, Succeeded
from forge.settings import Settings
from forge.vectorstore import IndexOptions, Row, VectorStore
from forge.vectorstore.bulk import IndexBuild

K = 10


def rows_of(vectors: np.ndarray, event: str) -> list[Row]:
    return [Row(f"r{i}", vectors[i], event, f"text {i}") for i in range(len(vectors))]


def live(store: VectorStore, name: str, vectors: np.ndarray, batch: int) -> float:
    started = time.perf_counter()
    for start, stop in batches(len(vectors), batch):
        event = f"{name}-{start}"
        rows = [Row(f"r{i}", vectors[i], event, f"text {i}") for i in range(start, stop)]
        store.write_batch(name, rows, [event], scope=name)
    return time.perf_counter() - started


def deferred(
    store: VectorStore, name: str, vectors: np.ndarray, storage: str, workers: int
) -> float:
    rows = rows_of(vectors, name)
    chunks = [rows[start:stop] for start, stop in batches(len(rows), 2048)]
    started = time.perf_counter()
    build = IndexBuild(workers=workers)
    store.bulk_load(name, vectors.shape[1], None, chunks, build, storage)
    return time.perf_counter() - started


def via_events(
    store: VectorStore, name: str, vectors: np.ndarray, deferred: bool, event_records: int
) -> float:
    """The load as new-data events through the handler, until the index is built."""
    rows = len(vectors) if deferred else 0
    settings = Settings(bulk_load_rows=min(Settings().bulk_load_rows, rows))
    stream = f"bench:{name}:new-data"
    events = [
        Message(
            NewData(
                id=f"e{n}",
                collection=name,
                records=[
                    Record(id=f"r{i}", vector=vectors[i].tolist(), text=f"text {i}")
                    for i in range(start, stop)
                ],
            ),
            stream,
            f"{n + 1}-0",
            1,
        )
        for n, (start, stop) in enumerate(batches(len(vectors), event_records))
    ]
    unread = [len(events)]
    service = EmbeddingService(settings, ModelCache.from_settings(settings), None)
    handler = NewDataHandler(settings, lambda: store, service, lambda _: unread[0])
    read = settings.embed_read_size
    started = time.perf_counter()
    for start in range(0, len(events), read):
        unread[0] = max(0, len(events) - start - read)
        outcomes = handler(events[start : start + read])
        if not all(isinstance(o, Succeeded) for o in outcomes):
            raise SystemExit(f"a new-data event failed: {outcomes}")
    while handler.indexes.watching() or not store.describe(name).versions[0].index.built:
        time.sleep(0.05)
    return time.perf_counter() - started


def recall(store: VectorStore, name: str, queries: np.ndarray, exact: list[set[str]]) -> float:
    found = sum(
        len({hit.id for hit in store.search(name, query, K)} & truth)
        for query, truth in zip(queries, exact, strict=True)
    )
    return found / (K * len(queries))


def run_all(url: str, args: argparse.Namespace) -> None:
    vectors, queries = embed(args.rows, args.queries)
    print_versions(url)
    exact = exact_top(vectors, queries)
    print(
        f"\n{'load':<20} {'seconds':>8} {'rows/s':>8} {'x live':>7} {'recall@10':>10} {'size':>9}"
    )
    base_rate = 0.0
    with VectorStore(url, max_connections=4, index=IndexOptions()) as store:
        for label, load in loads(args):
            name = f"bench_load_{uuid.uuid4().hex[:8]}"
            took = load(store, name, vectors)
            rate = len(vectors) / took
            base_rate = base_rate or rate
            found = recall(store, name, queries, exact)
            size_mb = store.describe(name).size_bytes / 2**20
            print(
                f"{label:<20} {took:>8.1f} {rate:>8,.0f} {rate / base_rate:>6.1f}x"
                f" {found:>10.3f} {size_mb:>6.1f} MiB"
            )
            store.drop_collection(name)


Load = Callable[[VectorStore, str, np.ndarray], float]


def loads(args: argparse.Namespace) -> list[tuple[str, Load]]:
    """The loads to compare, the baseline first."""
    if args.via_events:
        records = args.event_records
        return [
            ("events, live index", lambda s, n, v: via_events(s, n, v, False, records)),
            ("events, deferred", lambda s, n, v: via_events(s, n, v, True, records)),
        ]
    workers = args.index_workers
    return [
        ("live index", lambda s, n, v: live(s, n, v, args.batch)),
        ("deferred, vector", lambda s, n, v: deferred(s, n, v, "vector", workers)),
        ("deferred, halfvec", lambda s, n, v: deferred(s, n, v, "halfvec", workers)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1000, help="rows per live write")
    parser.add_argument("--index-workers", type=int, default=2)
    parser.add_argument("--postgres-url", default=None, help="default: embedded, temporary")
    parser.add_argument("--via-events", action="store_true", help="load through new-data")
    parser.add_argument("--event-records", type=int, default=10, help="records per event")
    args = parser.parse_args()
    with postgres_server(args.postgres_url) as (_, url, _):
        run_all(url, args)


if __name__ == "__main__":
    main()
