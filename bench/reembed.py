"""Benchmark: re-embedding a collection against its ceiling, searches during it, and
an upsert of unchanged content.

    .venv/bin/python bench/reembed.py [--records 3000] [--batch-size 32] [--depth 8]
        [--search-interval-ms 50] [--search-before-s 5] [--repeat 2] [--postgres-url URL]

The model is the packaged all-MiniLM-L6-v2, loaded as Forge loads it (fp16 on CUDA,
else the CPU), warmed up before anything is timed; texts are ``--records`` distinct
sentences of 10-14 words (``bench/embedding_pipeline.py``'s). PostgreSQL:
``--postgres-url``, else an embedded server in a temporary folder. The handlers are
the real ones, called in this process with the entries a worker would read (no Redis
stream in between: its cost is ``bench/embedding_pipeline.py``'s subject), and
without the embedding cache, so every text is encoded.

In order:

* ``ceiling``: bare ``SentenceTransformer.encode`` of every text (``--batch-size``),
  plus a raw binary COPY of (id, vector) into a plain table with the same HNSW index,
  a transaction per ``--batch-size`` rows: what the model and the database cost alone.
* ``first load``: ``NewDataHandler`` over one-record ``new-data`` events, read
  ``--depth`` x ``--batch-size`` at a time, into a fresh collection (version 1).
* ``unchanged``: the same records again under new event ids: every one must be
  answered ``unchanged``, with no model call and no write.
* ``re-embed``: ``ReembedHandler`` takes a ``reembed`` event (same model: what a
  library upgrade asks for) and then every ``reembed-batch`` it publishes, in order,
  until the switch to version 2, the batches in reads of ``--depth`` x ``--batch-size``
  entries as a worker reads them (each batch written while the next is embedded).
  Then ``re-embed, 1 batch per read``: the same again (to version 3), one batch per
  handler call, so every write waits: the overlap's baseline. During the first, a
  thread searches the collection (k=10) every ``--search-interval-ms``; the same
  thread searched for ``--search-before-s`` before the re-embedding began: search
  latency p50/p99 before against during.

Each round runs every step once, into a fresh collection; ``--repeat`` rounds, and the
best round of each step is reported (the machine is shared: bursts of other work slow
single steps), with the search latencies of all rounds together. Records/s of each step
and their ratios to the ceiling are printed; the checks (every record answered,
unchanged, the switch done, the row count) fail the run if broken.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from bench.embedding_pipeline import bare_encode, make_texts
from bench.write_path import postgres_server, raw_copy
from consumers.new_data import NewDataHandler
from consumers.once import Once
from consumers.reembed import ReembedHandler
from forge.embedding.model import Embedder
from forge.embedding.model_cache import ModelCache
from forge.embedding.service import EmbeddingService
from forge.events import NewData, Record, Reembed
from forge.runtime.handlers import Message, Outcome, Succeeded
from forge.settings import Settings
from forge.vectorstore import VectorStore

K = 10
QUERIES = 100


class Searcher(threading.Thread):
    """Searches the collection every ``interval_s`` until stopped; the latencies."""

    def __init__(self, url: str, collection: str, queries: np.ndarray, interval_s: float):
        super().__init__(daemon=True)
        self._url, self._collection = url, collection
        self._queries, self._interval_s = queries, interval_s
        self._done = threading.Event()
        self.latencies_s: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with VectorStore(self._url, max_connections=1) as store:
                for n in range(10**9):
                    if self._done.wait(self._interval_s):
                        return
                    started = time.perf_counter()
                    hits = store.search(self._collection, self._queries[n % len(self._queries)], K)
                    self.latencies_s.append(time.perf_counter() - started)
                    if len(hits) != K:
                        raise RuntimeError(f"a search found {len(hits)} rows, not {K}")
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def finish(self) -> list[float]:
        self._done.set()
        self.join()
        if self.error is not None:
            raise RuntimeError(f"search failed: {self.error}") from self.error
        return self.latencies_s


def message(event: Any, stream: str, n: int) -> Message[Any]:
    return Message(event, stream, f"{n}-0", 1)


def handle_in_reads(
    handler: Callable[[Sequence[Message[Any]]], list[Outcome]],
    messages: list[Message[Any]],
    read: int,
    in_flight: int,
) -> list[Outcome]:
    """``messages`` in reads of ``read`` entries, ``in_flight`` reads at once on threads
    of their own, as a worker's slots run them."""
    reads = [messages[start : start + read] for start in range(0, len(messages), read)]
    with futures.ThreadPoolExecutor(in_flight) as pool:
        return [outcome for outcomes in pool.map(handler, reads) for outcome in outcomes]


def upsert(
    handler: NewDataHandler,
    stream: str,
    collection: str,
    texts: list[str],
    run: str,
    read: int,
    in_flight: int,
) -> tuple[float, list[Outcome]]:
    messages = [
        message(NewData(id=f"{run}-{i}", collection=collection, records=[record]), stream, i)
        for i, record in enumerate(Record(id=f"r{i}", text=t) for i, t in enumerate(texts))
    ]
    started = time.perf_counter()
    outcomes = handle_in_reads(handler, messages, read, in_flight)
    return time.perf_counter() - started, outcomes


def reembed(
    handler: ReembedHandler, stream: str, collection: str, run: str, read: int, in_flight: int
) -> tuple[float, Outcome]:
    """Re-embed the collection: the ``reembed`` event, then its batches in reads of
    ``read`` entries, as a worker reads them. The seconds, and the last outcome."""
    started = time.perf_counter()
    begin = Reembed(id=f"reembed-{run}", collection=collection)
    (begun,) = handler([message(begin, stream, 0)])
    check(isinstance(begun, Succeeded), f"reembed: {begun}")
    assert isinstance(begun, Succeeded)
    batches = [message(batch, stream, n) for n, (_, batch) in enumerate(begun.publish, 1)]
    outcomes = handle_in_reads(handler, batches, read, in_flight)
    return time.perf_counter() - started, outcomes[-1]


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"FAIL: {what}")


def percentiles_ms(latencies_s: list[float]) -> str:
    check(len(latencies_s) >= 10, f"only {len(latencies_s)} searches")
    p50, p99 = np.percentile(np.array(latencies_s) * 1e3, [50, 99])
    return f"p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  ({len(latencies_s)} searches)"


def run_all(url: str, home: Path, args: argparse.Namespace) -> None:
    embedder = Embedder.load()
    texts = make_texts(args.records)
    queries, _ = bare_encode(embedder.model, make_texts(QUERIES, seed=11), args.batch_size, False)
    print(f"device {embedder.device}, {args.records} records, batch {args.batch_size}")
    settings = Settings(
        postgres_url=url,
        max_batch_size=args.batch_size,
        embed_pipeline_depth=args.depth,
        home_dir=home,
        # Live index maintenance, as this benchmark's ceiling measures it.
        bulk_load_rows=0,
    )
    models = ModelCache.from_settings(settings)
    models.get_or_load(f"embedder:{embedder.name}", lambda: embedder, lambda e: e.size_bytes)
    service = EmbeddingService(settings, models, None)
    best: dict[str, float] = {}
    before: list[float] = []
    during: list[float] = []
    for number in range(1, args.repeat + 1):
        took, searched = one_round(url, settings, service, embedder, texts, queries, args)
        print(f"round {number}: " + ", ".join(f"{k} {v:.2f} s" for k, v in took.items()))
        best = {k: min(v, best.get(k, v)) for k, v in took.items()}
        before.extend(searched[0])
        during.extend(searched[1])
    report(best, before, during, args.records)


def one_round(
    url: str,
    settings: Settings,
    service: EmbeddingService,
    embedder: Embedder,
    texts: list[str],
    queries: np.ndarray,
    args: argparse.Namespace,
) -> tuple[dict[str, float], tuple[list[float], list[float]]]:
    """Every step once, into a fresh collection: seconds per step, and the search
    latencies before and during the re-embedding."""
    took: dict[str, float] = {}
    vectors, seconds = bare_encode(embedder.model, texts, args.batch_size, False)
    took["encode"] = seconds[0]
    started = time.perf_counter()
    raw_copy(url, vectors, args.batch_size, hnsw=True)
    took["copy"] = time.perf_counter() - started
    took["ceiling"] = took["encode"] + took["copy"]
    collection = f"bench_{uuid.uuid4().hex[:8]}"
    stream = f"bench:{uuid.uuid4().hex[:8]}:new-data"
    read, in_flight = settings.embed_read_size, settings.embed_reads_in_flight
    # A worker's pool: reads in flight and the writers hold a connection each.
    with VectorStore(url, max_connections=4) as store:
        new_data = NewDataHandler(settings, Once(lambda: store), service)
        took["first load"], outcomes = upsert(
            new_data, stream, collection, texts, "load", read, in_flight
        )
        check(all(isinstance(o, Succeeded) for o in outcomes), "first load: every event")
        took["unchanged"], outcomes = upsert(
            new_data, stream, collection, texts, "again", read, in_flight
        )
        unchanged = sum(o.result.get("unchanged", 0) for o in outcomes if isinstance(o, Succeeded))
        check(unchanged == len(texts), f"unchanged: {unchanged} of {len(texts)}")

        searcher = Searcher(url, collection, queries, args.search_interval_ms / 1e3)
        searcher.start()
        time.sleep(args.search_before_s)  # a fixed sample of searches, not a race
        before = searcher.finish()
        searcher = Searcher(url, collection, queries, args.search_interval_ms / 1e3)
        searcher.start()
        handler = ReembedHandler(settings, Once(lambda: store), service)
        took["re-embed"], last = reembed(handler, stream, collection, "read", read, in_flight)
        during = searcher.finish()
        check(isinstance(last, Succeeded) and bool(last.result.get("switched")), f"switch: {last}")
        info = store.describe(collection)
        check(info.active_version == 2 and info.rows == len(texts), f"after: {info}")
        store.versions.drop(collection, 1)
        # The baseline of the overlap: one batch per read and one read at a time, so
        # every write waits.
        took["re-embed, 1/read"], last = reembed(handler, stream, collection, "one", 1, 1)
        check(isinstance(last, Succeeded) and bool(last.result.get("switched")), f"switch: {last}")
        store.drop_collection(collection)
    return took, (before, during)


def report(best: dict[str, float], before: list[float], during: list[float], records: int) -> None:
    ceiling = records / best["ceiling"]
    print(f"\n{'step (best round)':<26} {'seconds':>8} {'records/s':>10} {'x ceiling':>10}")
    for label, key in (
        ("ceiling: encode + COPY", "ceiling"),
        ("first load (pipeline)", "first load"),
        ("re-embed (backfill)", "re-embed"),
        ("re-embed, 1 batch per read", "re-embed, 1/read"),
        ("unchanged upsert", "unchanged"),
    ):
        rate = records / best[key]
        print(f"{label:<26} {best[key]:>8.2f} {rate:>10,.0f} {rate / ceiling:>9.2f}x")
    print(f"  (bare encode {best['encode']:.2f} s, COPY with HNSW {best['copy']:.2f} s)")
    print(f"\nsearch before re-embed   {percentiles_ms(before)}")
    print(f"search during re-embed   {percentiles_ms(during)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--search-interval-ms", type=float, default=50.0)
    parser.add_argument("--search-before-s", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=2, help="rounds; best of each step")
    parser.add_argument("--postgres-url", default=None, help="default: embedded, temporary")
    args = parser.parse_args()
    with postgres_server(args.postgres_url) as (home, url, _):
        run_all(url, home, args)


if __name__ == "__main__":
    main()
