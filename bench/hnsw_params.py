"""Benchmark: HNSW index parameters, ingest cost against search recall.

    .venv/bin/python bench/hnsw_params.py [--rows 2000] [--queries 200]
        [--variants m16:efc64,m16:efc32,m12:efc40,m8:efc32] [--ef-search 40,100]
        [--batch 32] [--postgres-url URL]

Vectors: the packaged all-MiniLM-L6-v2's embeddings of distinct short sentences (made as
``bench/embedding_pipeline.py`` makes them): ``--rows`` to store and ``--queries``
others to search with. PostgreSQL: ``--postgres-url``, else an embedded server in a
temporary folder.

* ``raw COPY, no index`` (the baseline): binary COPY of (id, embedding) into a plain
  table, ``--batch`` rows per transaction; the vectors are copied several times over
  (``BASELINE_ROWS`` rows in all), as its CPU time is otherwise too short for psutil's
  clock-tick resolution.
* each variant ``mM:efcE``: ``VectorStore.write_batch`` (one event of ``--batch``
  rows per call, as a worker writes one model batch) into a fresh collection that a
  store with ``IndexOptions(m=M, ef_construction=E)`` creates on the first write.

For each: rows/s (wall clock), CPU milliseconds per row of the PostgreSQL backend that
did the writes (psutil on its ``pg_backend_pid()``, found by application name) and
that CPU against the baseline's. Then, per ``--ef-search`` value, recall@10: the share
of the exact 10 nearest rows (cosine, numpy over every stored vector) that
``VectorStore.search`` returns, averaged over the queries, and the mean query time.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil  # type: ignore[import-untyped]
import psycopg
from pgvector.psycopg import register_vector
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from bench.embedding_pipeline import make_texts
from bench.write_path import batches, copy_raw, postgres_server
from forge.embedding.model import Embedder
from forge.vectorstore import IndexOptions, Row, VectorStore

Vectors = np.ndarray
K = 10
APP_NAME = "forge-bench-hnsw"
ENCODE_BATCH = 64
BASELINE_ROWS = 20_000


@dataclasses.dataclass
class Ingest:
    rows: int
    wall_s: float
    cpu_s: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s

    @property
    def cpu_ms_per_row(self) -> float:
        return 1000 * self.cpu_s / self.rows


def parse_variants(text: str) -> list[IndexOptions]:
    """``m16:efc64,m8:efc32`` -> index options (``ConfigError`` for values pgvector refuses)."""
    variants = []
    for item in text.split(","):
        m, efc = item.strip().split(":")
        if not (m.startswith("m") and efc.startswith("efc")):
            raise SystemExit(f"--variants: {item!r} is not like m16:efc64")
        variants.append(IndexOptions(m=int(m[1:]), ef_construction=int(efc[3:])))
    return variants


def label(index: IndexOptions) -> str:
    return f"m{index.m}:efc{index.ef_construction}"


def backend_cpu_s(pids: list[int]) -> float:
    """User and system CPU seconds of these backends so far."""
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


@contextmanager
def measured(pids: Callable[[], list[int]], rows: int, out: list[Ingest]) -> Iterator[None]:
    """Appends the wall and backend CPU time of the block to ``out``."""
    # A backend whose connection just closed (the store's migration) may still be listed.
    backends = [pid for pid in pids() if psutil.pid_exists(pid)]
    cpu_before, started = backend_cpu_s(backends), time.perf_counter()
    yield
    wall_s = time.perf_counter() - started
    out.append(Ingest(rows, wall_s, backend_cpu_s(backends) - cpu_before))


def raw_copy(url: str, vectors: Vectors, batch: int, times: int = 1) -> Ingest:
    out: list[Ingest] = []
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("DROP TABLE IF EXISTS bench_raw")
        conn.execute(f"CREATE TABLE bench_raw (id text, embedding vector({vectors.shape[1]}))")
        pid = int(conn.info.backend_pid)
        with measured(lambda: [pid], times * len(vectors), out):
            for _ in range(times):
                copy_raw(conn, vectors, batch)
    return out[0]


def store_pids(admin: psycopg.Connection[tuple[int]]) -> list[int]:
    query = "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
    return [row[0] for row in admin.execute(query, [APP_NAME]).fetchall()]


def ingest(url: str, store: VectorStore, name: str, vectors: Vectors, batch: int) -> Ingest:
    out: list[Ingest] = []
    admin = psycopg.connect(url, autocommit=True)
    with admin, measured(lambda: store_pids(admin), len(vectors), out):
        for start, stop in batches(len(vectors), batch):
            event = f"{name}-{start}"
            rows = [Row(f"r{i}", vectors[i], event) for i in range(start, stop)]
            store.write_batch(name, rows, [event], scope=name)
    return out[0]


def exact_top(stored: Vectors, queries: Vectors) -> list[set[str]]:
    scores = queries @ stored.T  # unit vectors: dot product is cosine similarity
    top = np.argsort(-scores, axis=1)[:, :K]
    return [{f"r{i}" for i in row} for row in top]


def recall(store: VectorStore, name: str, queries: Vectors, exact: list[set[str]]) -> str:
    store.search(name, queries[0], K)  # warm-up: the connection's first query plans it
    found, started = 0, time.perf_counter()
    for query, truth in zip(queries, exact, strict=True):
        found += len({hit.id for hit in store.search(name, query, K)} & truth)
    query_ms = 1000 * (time.perf_counter() - started) / len(queries)
    return f"{found / (K * len(queries)):.3f} ({query_ms:.1f} ms)"


def run_variant(
    url: str, index: IndexOptions, vectors: Vectors, queries: Vectors, args: argparse.Namespace
) -> tuple[Ingest, list[str]]:
    name = f"bench_{label(index).replace(':', '_')}"
    app_url = make_conninfo(url, application_name=APP_NAME)
    # One connection, so its backend did every write of the variant.
    with VectorStore(app_url, min_connections=1, max_connections=1, index=index) as store:
        store.drop_collection(name)
        done = ingest(url, store, name, vectors, args.batch)
    exact = exact_top(vectors, queries)
    recalls = []
    for ef_search in args.ef_search:
        searching = dataclasses.replace(index, ef_search=ef_search)
        with VectorStore(url, max_connections=1, index=searching) as store:
            recalls.append(recall(store, name, queries, exact))
    return done, recalls


def embed(rows: int, queries: int) -> tuple[Vectors, Vectors]:
    embedder = Embedder.load()
    started = time.perf_counter()
    vectors = embedder.encode(make_texts(rows + queries), ENCODE_BATCH)
    print(
        f"{rows} rows + {queries} queries embedded by {embedder.name} on {embedder.device}"
        f" in {time.perf_counter() - started:.0f} s ({embedder.dimension}-d)"
    )
    return vectors[:rows], vectors[rows:]


def print_versions(url: str) -> None:
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT current_setting('server_version'), extversion"
            " FROM pg_extension WHERE extname = 'vector'"
        ).fetchone()
    if found:
        print(f"PostgreSQL {found[0]}, pgvector {found[1]}")


def run_all(url: str, args: argparse.Namespace) -> None:
    variants = parse_variants(args.variants)
    vectors, queries = embed(args.rows, args.queries)
    print_versions(url)
    raw_copy(url, vectors[: 4 * args.batch], args.batch)  # warm-up
    base = raw_copy(url, vectors, args.batch, times=math.ceil(BASELINE_ROWS / len(vectors)))
    efs = "  ".join(f"recall@{K} ef{e:<4} (query)" for e in args.ef_search)
    print(f"\n{'variant':<20} {'rows/s':>8} {'pg CPU ms/row':>14} {'x raw COPY':>11}  {efs}")
    print(f"{'raw COPY, no index':<20} {base.rows_per_s:>8,.0f} {base.cpu_ms_per_row:>14.3f}")
    for index in variants:
        done, recalls = run_variant(url, index, vectors, queries, args)
        ratio = done.cpu_ms_per_row / base.cpu_ms_per_row
        line = f"{label(index):<20} {done.rows_per_s:>8,.0f} {done.cpu_ms_per_row:>14.3f}"
        print(f"{line} {ratio:>10.1f}x  " + "  ".join(f"{r:<23}" for r in recalls).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--variants", default="m16:efc64,m16:efc32,m12:efc40,m8:efc32")
    parser.add_argument(
        "--ef-search", type=lambda v: [int(x) for x in v.split(",")], default=[40, 100]
    )
    parser.add_argument("--batch", type=int, default=32, help="rows per write transaction")
    parser.add_argument("--postgres-url", default=None, help="default: embedded, temporary")
    args = parser.parse_args()
    with postgres_server(args.postgres_url) as (_, url, _):
        run_all(url, args)


if __name__ == "__main__":
    main()
