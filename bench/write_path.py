"""Benchmark: Forge's vector write path against a raw binary COPY of the same vectors.

    .venv/bin/python bench/write_path.py [--rows 50000] [--batch 1000] [--dim 384]

Uses ``--postgres-url`` when given, else an embedded server in a
temporary folder. Variants, each on its own fresh table, same vectors, same batches:

* ``raw-copy``: psycopg ``write_row`` binary COPY of (id, embedding) into a plain
  table with no index: the ceiling.
* ``write-path``: ``VectorStore.write_batch`` (claim event ids, binary COPY into the
  staging table, ``INSERT ... ON CONFLICT``) into a collection table without its HNSW
  index, first as inserts then as updates of the same ids.
* ``raw-copy+hnsw`` / ``write-path+hnsw``: both again with an HNSW cosine index on
  the table (the real configuration: index maintenance then dominates both).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from forge.servers.embedded_postgres import start_embedded_postgres
from forge.vectorstore import Row, VectorStore
from forge.vectorstore.naming import index_name

Vectors = np.ndarray


def batches(count: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, count, size):
        yield start, min(start + size, count)


def timed(
    label: str,
    rows: int,
    run: Callable[[], None],
    repeat: int,
    setup: Callable[[], None] | None = None,
) -> float:
    """Best of ``repeat`` runs (this machine is shared and noisy), in rows/s."""
    best_s = float("inf")
    for _ in range(repeat):
        if setup is not None:
            setup()
        started = time.perf_counter()
        run()
        best_s = min(best_s, time.perf_counter() - started)
    rate = rows / best_s
    print(f"{label:<24} {rows:>8} rows  best of {repeat}: {best_s:7.3f} s {rate:>10,.0f} rows/s")
    return rate


def raw_copy(url: str, vectors: Vectors, batch: int, hnsw: bool = False) -> None:
    dim = vectors.shape[1]
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("DROP TABLE IF EXISTS bench_raw")
        conn.execute(
            sql.SQL("CREATE TABLE bench_raw (id text, embedding vector({}))").format(
                sql.Literal(dim)
            )
        )
        if hnsw:
            conn.execute("CREATE INDEX ON bench_raw USING hnsw (embedding vector_cosine_ops)")
        copy_raw(conn, vectors, batch)


def copy_raw(conn: psycopg.Connection[Any], vectors: Vectors, batch: int) -> None:
    """Binary COPY of (id, embedding) into ``bench_raw``, one transaction per batch."""
    for start, stop in batches(len(vectors), batch):
        with conn.transaction(), conn.cursor() as cur:
            copy_sql = "COPY bench_raw (id, embedding) FROM STDIN WITH (FORMAT BINARY)"
            with cur.copy(copy_sql) as copy:
                copy.set_types(["text", "vector"])
                for i in range(start, stop):
                    copy.write_row((f"rec-{i}", vectors[i]))


_runs = itertools.count()


def write_path(store: VectorStore, name: str, vectors: Vectors, batch: int) -> None:
    run = next(_runs)  # fresh event ids, so no batch is skipped as a duplicate
    for number, (start, stop) in enumerate(batches(len(vectors), batch)):
        event_id = f"run{run}-batch{number}"
        rows = [
            Row(id=f"rec-{i}", embedding=vectors[i], event_id=event_id) for i in range(start, stop)
        ]
        store.write_batch(name, rows, [event_id], scope=f"bench-{name}")


def fresh_collection(store: VectorStore, url: str, name: str, dim: int, hnsw: bool) -> None:
    store.drop_collection(name)
    collection = store.ensure_collection(name, dim, "bench")
    if not hnsw:
        with psycopg.connect(url, autocommit=True) as conn:
            index = sql.Identifier(index_name(collection.table))
            conn.execute(sql.SQL("DROP INDEX {}").format(index))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--hnsw-rows", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--postgres-url", default=None)
    args = parser.parse_args()

    rng = np.random.default_rng(42)
    vectors = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    with postgres_server(args.postgres_url) as (_, url, _):
        run_all(url, vectors, args)


@contextlib.contextmanager
def postgres_server(url: str | None) -> Iterator[tuple[Path, str, Path | None]]:
    """A temporary folder, and ``url`` or else an embedded server's in that folder
    (stopped on exit) with its data folder (``None`` for an external server)."""
    with tempfile.TemporaryDirectory(prefix="forge-bench-") as temp:
        home = Path(temp)
        if url is not None:
            yield home, url, None
            return
        handle = start_embedded_postgres(home / "postgres")
        try:
            yield home, handle.url, handle.pgdata
        finally:
            handle.stop()


def run_all(url: str, vectors: Vectors, args: argparse.Namespace) -> None:
    n, dim, batch, repeat = len(vectors), args.dim, args.batch, args.repeat
    print(f"{n} x {dim}-d float32 vectors, batches of {batch} rows")
    with VectorStore(url, max_connections=2) as store:
        # Warm up catalog caches and prepared statements on both paths.
        fresh_collection(store, url, "bench_warm", dim, hnsw=False)
        write_path(store, "bench_warm", vectors[: 2 * batch], batch)
        raw_copy(url, vectors[: 2 * batch], batch)

        raw = timed("raw-copy", n, lambda: raw_copy(url, vectors, batch), repeat)
        ins = timed(
            "write-path insert",
            n,
            lambda: write_path(store, "bench_plain", vectors, batch),
            repeat,
            setup=lambda: fresh_collection(store, url, "bench_plain", dim, hnsw=False),
        )
        upd = timed(
            "write-path update", n, lambda: write_path(store, "bench_plain", vectors, batch), repeat
        )
        print(f"no index: insert/raw = {ins / raw:.2f}x, update/raw = {upd / raw:.2f}x")

        if args.hnsw_rows:
            m = min(args.hnsw_rows, n)
            raw_hnsw = timed(
                "raw-copy+hnsw", m, lambda: raw_copy(url, vectors[:m], batch, hnsw=True), 1
            )
            hnsw = timed(
                "write-path+hnsw insert",
                m,
                lambda: write_path(store, "bench_hnsw", vectors[:m], batch),
                1,
                setup=lambda: fresh_collection(store, url, "bench_hnsw", dim, hnsw=True),
            )
            print(f"hnsw: write-path/raw = {hnsw / raw_hnsw:.2f}x")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS bench_raw")
        for name in ("bench_warm", "bench_plain", "bench_hnsw"):
            store.drop_collection(name)


if __name__ == "__main__":
    main()
