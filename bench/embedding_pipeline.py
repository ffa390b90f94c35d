"""Benchmark: the embedding pipeline (stream -> model -> pgvector) against bare ``model.encode``,
and the vector write path against a raw binary COPY of the same vectors.

    .venv/bin/python bench/embedding_pipeline.py [--events 2000] [--records-per-event 1]
        [--batch-size 32] [--depth 8] [--reads-in-flight 2] [--torch-threads N] [--hnsw-m 16]
        [--hnsw-ef-construction 64] [--postgres-url URL]
        [--redis-url redis://127.0.0.1:6379/0] [--repeat 1] [--profile] [--skip-no-index]
        [--skip-write-path]

The model is the packaged all-MiniLM-L6-v2, loaded as Forge loads it: on CUDA when
``torch.cuda.is_available()`` (fp16 there), else on the CPU with torch's default thread
count. The device and thread count are printed. The model is loaded and warmed up before
anything is timed, so no figure includes model loading. Every text is a distinct sentence
of 10 to 14 words (12 on average), so the embedding cache never hits.

In each repeat, in this order:

* ``bare encode``: the underlying ``SentenceTransformer.encode`` of all the texts in one
  call with ``batch_size=--batch-size`` (normalised, to numpy): the model's ceiling.
* ``bare encode, per batch``: the same, one call per ``--batch-size`` texts, which is
  how a worker reading ``--batch-size`` events hands them to the model.
* ``pipeline``: the events are pre-published to a fresh ``new-data`` stream under a
  ``bench:<uuid>:`` prefix; a ``Worker`` with the real ``NewDataHandler`` (embedding
  cache on, empty, so every text is a miss and is encoded) reading ``--depth`` x
  ``--batch-size`` events at a time, ``--reads-in-flight`` reads at once, as
  ``consumers.register`` sets it up (each model batch is written on the writer thread
  while the next is embedded, the next read's included), is driven with
  ``run_once()`` from the first read until every entry is settled, writing into a fresh
  collection that the store creates, with its HNSW index, on the first write
  (``FORGE_BULK_LOAD_ROWS=0``: the index is maintained live, as the ceiling's). Checked
  afterwards: one succeeded completion per event, nothing pending, every record in the
  collection, no cache hits, and stored vectors equal to the bare model's.
* ``pipeline, no index`` (diagnostic, unless ``--skip-no-index``): the same into a
  collection created beforehand whose HNSW index is dropped, to separate Forge's own
  cost from the index maintenance PostgreSQL does on the same cores.

Each pipeline run prints where its time went (the model, the embedding cache, the
database write, the rest of the handler, the stream runtime) and the CPU seconds used by
this process and by the embedded PostgreSQL server. The summary gives each variant's
best run and a noise-filtered figure: per batch the fastest of the repeats, summed (batch
k is the same work in every repeat), which discards bursts of load from other processes
on a shared machine.

Then the write path, on the vectors the model produced, in transactions of the rows one
pipeline batch writes (``--batch-size`` x ``--records-per-event``), with the variants of
``bench/write_path.py``: ``VectorStore.write_batch`` (claim, binary COPY into staging,
upsert) into a collection table with its HNSW index, against a raw binary COPY of (id,
embedding) into a plain table with the same HNSW index; then both without the index.

``--profile`` runs cProfile over the last pipeline run and prints where time went.
Only keys under this run's ``bench:<uuid>:`` prefix are touched, and they are deleted at
the end; the embedded PostgreSQL server lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import random
import resource
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import psutil  # type: ignore[import-untyped]
import psycopg
import redis
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from bench.write_path import fresh_collection, postgres_server, raw_copy, timed, write_path
from consumers.new_data import NewDataHandler
from consumers.once import Once
from forge.embedding.cache import EmbeddingCache
from forge.embedding.model import Embedder
from forge.embedding.model_cache import ModelCache
from forge.embedding.service import EmbeddingService
from forge.events import EVENT_FIELD, Completion, NewData
from forge.observability.metrics import Metrics
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, HandlerSpec, Message, Outcome
from forge.runtime.worker import Worker
from forge.servers.connect import connect_redis
from forge.settings import Settings
from forge.vectorstore import VectorStore
from forge.vectorstore.naming import index_name
from tests.support.redis_helpers import delete_prefix

CONSUMER = "bench-pipeline"
TIMEOUT_S = 1800.0  # per pipeline run: a pipeline that stops settling fails the benchmark
WARMUP_TEXTS = 64

_encoder = msgspec.json.Encoder()
_completion = msgspec.json.Decoder(Completion)

# Everyday support-ticket vocabulary: mostly single word pieces, as real short texts are.
_VOCABULARY = """
account address after again agent app asked at back bank before billing box broken but
button call can cancel card cart charge charged checkout click code confirm contact could
coupon credit customer damaged data day delivery device discount does download email
error every exchange expired failed fast file fix for from get help home how invoice
issue item keeps last late link login lost mail message missing mobile money month my
never new no not notification number of offer on once online order package page paid
password payment phone photo plan please price problem product profile receipt received
refund reset return screen second sent service settings shipping should size slow some
still store subscription support sync the this ticket time today tracking tried twice
update upgrade user wallet want was week when why with work wrong yesterday your
"""
WORDS = _VOCABULARY.split()


def make_texts(count: int, seed: int = 7) -> list[str]:
    """``count`` distinct sentences of 10 to 14 words."""
    rng = random.Random(seed)
    texts: dict[str, None] = {}
    while len(texts) < count:
        words = rng.choices(WORDS, k=rng.randint(10, 14))
        texts[" ".join(words).capitalize() + "."] = None
    return list(texts)


def payloads(texts: Sequence[str], per_event: int, collection: str) -> list[bytes]:
    return [
        _encoder.encode(
            {
                "type": "new-data",
                "id": f"e{start}",
                "collection": collection,
                "records": [
                    {"id": f"r{i}", "text": texts[i], "metadata": {"lang": "en"}}
                    for i in range(start, min(start + per_event, len(texts)))
                ],
            }
        )
        for start in range(0, len(texts), per_event)
    ]


class ServerCpu:
    """CPU seconds used so far by the embedded PostgreSQL server (postmaster, live
    children, and the children it reaped), to see what the database costs and whether
    it works in the background; ``None`` for an external server."""

    def __init__(self, pgdata: Path | None) -> None:
        self._pid: int | None = None
        if pgdata is not None:
            self._pid = int((pgdata / "postmaster.pid").read_text().split()[0])

    def read(self) -> float | None:
        if self._pid is None:
            return None
        try:
            server = psutil.Process(self._pid)
            times = server.cpu_times()
            total = times.user + times.system + times.children_user + times.children_system
            for child in server.children(recursive=True):
                try:
                    child_times = child.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                total += child_times.user + child_times.system
        except (psutil.Error, OSError):
            return None
        return float(total)


class CpuMeter:
    """This process's and the database server's CPU seconds over a block of work."""

    def __init__(self, server: ServerCpu) -> None:
        self._server = server
        self.own_s = 0.0
        self.server_s: float | None = None

    def __enter__(self) -> CpuMeter:
        self._own = _own_cpu_s()
        self._db = self._server.read()
        return self

    def __exit__(self, *exc: object) -> None:
        self.own_s = _own_cpu_s() - self._own
        after = self._server.read()
        self.server_s = None if after is None or self._db is None else after - self._db

    def describe(self) -> str:
        db = "" if self.server_s is None else f", postgres {self.server_s:.2f}"
        return f"cpu s: forge {self.own_s:.2f}{db}"


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------- bare model


def bare_encode(
    model: Any, texts: list[str], batch_size: int, per_batch: bool
) -> tuple[np.ndarray, list[float]]:
    """The vectors, and the seconds each call took (one call, or one per batch)."""
    chunk = batch_size if per_batch else len(texts)
    parts: list[np.ndarray] = []
    seconds: list[float] = []
    for start in range(0, len(texts), chunk):
        started = time.perf_counter()
        vectors = model.encode(
            texts[start : start + chunk],
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        seconds.append(time.perf_counter() - started)
        parts.append(np.asarray(vectors, dtype=np.float32))
    return np.concatenate(parts), seconds


# ---------------------------------------------------------------------------- pipeline


@dataclass
class PipelineRun:
    wall_s: float  # from the first read until the last entry is settled
    batch_s: list[float]  # per worker iteration (one batch read, handled and settled)
    encode_s: list[float]  # per batch, inside Embedder.encode (tokenising included)
    service_s: float  # inside EmbeddingService.encode: the model and the embedding cache
    write_s: float  # inside VectorStore.write_batch: the database transaction
    write_behind_s: float  # the part of write_s spent on the writer thread, beside the model
    handler_s: float  # inside NewDataHandler: all of the above and the rest of the handler
    # Several reads in flight: handler calls overlap each other on slot threads, so
    # the per-iteration times and the handler's share are not told apart.
    reads_overlap: bool = False

    def describe(self, sentences: int, cpu: str) -> str:
        encode = sum(self.encode_s)
        outside = (self.wall_s - encode) / sentences * 1e6
        if self.reads_overlap:
            return (
                f"\n{'':8}{self.wall_s:.2f} s: model {encode:.2f},"
                f" embedding cache {self.service_s - encode:.2f}, db write {self.write_s:.2f}"
                f" (handler calls overlap across reads); {outside:.0f} us/sentence outside"
                f" the model; {cpu}"
            )
        return (
            f"\n{'':8}{self.wall_s:.2f} s: model {encode:.2f},"
            f" embedding cache {self.service_s - encode:.2f},"
            f" db write {self.write_s:.2f} ({self.write_behind_s:.2f} of it beside the model),"
            f" rest of handler"
            f" {self.handler_s - self.service_s - (self.write_s - self.write_behind_s):.2f},"
            f" stream runtime {self.wall_s - self.handler_s:.2f};"
            f" {outside:.0f} us/sentence outside the model; {cpu}"
        )


class _Timed:
    """Records the wall time of each call to a callable."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.name: str = getattr(fn, "__name__", "__call__")
        self.seconds: list[float] = []
        self.background_s = 0.0  # calls made on threads other than the main one

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - started)
            if threading.current_thread() is not threading.main_thread():
                self.background_s += self.seconds[-1]


def build_worker(
    args: argparse.Namespace,
    embedder: Embedder,
    store: VectorStore,
    url: str,
    prefix: str,
    home: Path,
) -> tuple[Context, Worker, NewDataHandler, _Timed]:
    """A worker as ``forge worker`` builds it, with the loaded model and a timed handler."""
    settings = Settings(
        redis_url=args.redis_url,
        postgres_url=url,
        stream_prefix=prefix,
        max_batch_size=args.batch_size,
        embed_pipeline_depth=args.depth,
        embed_reads_in_flight=args.reads_in_flight,
        read_block_s=0.01,
        home_dir=home,
        # Live index maintenance, as this benchmark's ceiling measures it.
        bulk_load_rows=0,
    )
    client = connect_redis(args.redis_url)
    ctx = Context(settings=settings, redis=client, metrics=Metrics(gpu=False), consumer=CONSUMER)
    models = ModelCache.from_settings(settings)
    models.get_or_load(f"embedder:{embedder.name}", lambda: embedder, lambda e: e.size_bytes)
    service = EmbeddingService(
        settings, models, EmbeddingCache.from_settings(client, settings), ctx.metrics
    )
    handler = NewDataHandler(settings, Once(lambda: store), service)
    timed_handler = _Timed(handler)

    def handle(messages: Sequence[Message[NewData]]) -> list[Outcome]:
        result: list[Outcome] = timed_handler(messages)
        return result

    registry = HandlerRegistry()
    # Read as `consumers.register` reads: several model batches at once.
    reads = settings.embed_read_size
    spec = HandlerSpec(
        "new-data",
        NewData,
        handle,
        name="embed",
        max_batch_size=reads,
        concurrency=settings.embed_reads_in_flight,
    )
    registry.register(spec)
    return ctx, Worker(ctx, registry), handler, timed_handler


def run_pipeline(
    args: argparse.Namespace,
    embedder: Embedder,
    store: VectorStore,
    url: str,
    prefix: str,
    texts: Sequence[str],
    reference: np.ndarray,
    home: Path,
    profile: cProfile.Profile | None,
    hnsw: bool = True,
) -> PipelineRun:
    """One pipeline run into a fresh collection: created by the store on the first write
    (with its HNSW index), or, with ``hnsw=False``, created beforehand and its index
    dropped (a diagnostic: the pipeline without index maintenance)."""
    collection = f"bench_{uuid.uuid4().hex[:12]}"
    if not hnsw:
        created = store.ensure_collection(collection, embedder.dimension, embedder.name)
        with psycopg.connect(url, autocommit=True) as conn:
            index = sql.Identifier(index_name(created.table))
            conn.execute(sql.SQL("DROP INDEX {}").format(index))
    ctx, worker, handler, timed_handler = build_worker(args, embedder, store, url, prefix, home)
    data = payloads(texts, args.records_per_event, collection)
    stream = ctx.keys.new_data
    for start in range(0, len(data), 1000):
        pipe = ctx.redis.pipeline(transaction=False)
        for payload in data[start : start + 1000]:
            pipe.xadd(stream, {EVENT_FIELD: payload})
        pipe.execute()
    ctx.broker.ensure_groups(worker.streams)

    # Timers on the model, the embedding service and the store, as instance attributes
    # that shadow the methods for this run only.
    timers = {
        "encode": (embedder, _Timed(embedder.encode)),
        "service": (handler.embedding, _Timed(handler.embedding.encode)),
        "write": (store, _Timed(store.write_batch)),
    }
    for target, timer in timers.values():
        setattr(target, timer.name, timer)
    settled = 0
    batch_s: list[float] = []
    try:
        if profile is not None:
            profile.enable()
        started = time.perf_counter()
        while settled < len(data):
            begun = time.perf_counter()
            done = worker.run_once()
            if done and args.reads_in_flight == 1:
                batch_s.append(time.perf_counter() - begun)
            settled += done
            if time.perf_counter() - started > TIMEOUT_S:
                raise SystemExit(f"only {settled} of {len(data)} events settled")
        wall_s = time.perf_counter() - started
        if profile is not None:
            profile.disable()
    finally:
        for target, timer in timers.values():
            delattr(target, timer.name)  # back to the class's method
    verify(ctx, store, collection, len(data), texts, reference)
    store.drop_collection(collection)
    ctx.redis.close()
    return PipelineRun(
        wall_s,
        batch_s,
        timers["encode"][1].seconds,
        sum(timers["service"][1].seconds),
        sum(timers["write"][1].seconds),
        timers["write"][1].background_s,
        sum(timed_handler.seconds),
        reads_overlap=args.reads_in_flight > 1,
    )


def verify(
    ctx: Context,
    store: VectorStore,
    collection: str,
    events: int,
    texts: Sequence[str],
    reference: np.ndarray,
) -> None:
    """Every event succeeded once, nothing pending, all records stored, no cache hits,
    and the stored vectors are the bare model's."""
    entries: list[Any] = ctx.redis.xrange(ctx.keys.completions)  # type: ignore[assignment]
    completions = [_completion.decode(fields[EVENT_FIELD]) for _, fields in entries]
    failed = [c for c in completions if c.status != "succeeded"]
    pending = int(ctx.redis.xpending(ctx.keys.new_data, ctx.keys.group)["pending"])
    cached = sum(int(c.result.get("from_cache", 0)) for c in completions)
    stored = store.count(collection)
    if len(completions) != events or failed or pending or cached or stored != len(texts):
        raise SystemExit(
            f"pipeline: {len(completions)} completions ({len(failed)} not succeeded) for"
            f" {events} events, {pending} pending, {cached} cache hits,"
            f" {stored} of {len(texts)} records stored"
        )
    sample = [f"r{i}" for i in range(0, len(texts), max(len(texts) // 50, 1))]
    found = store.fetch(collection, sample)
    worst = min(
        float(np.dot(np.asarray(found[rid].embedding, dtype=np.float32), reference[int(rid[1:])]))
        for rid in sample
    )
    if worst < 0.999:
        raise SystemExit(f"pipeline vectors differ from the bare model's (cosine {worst:.4f})")


# ---------------------------------------------------------------------------- write path


def write_comparison(
    url: str, store: VectorStore, vectors: np.ndarray, batch: int, repeat: int
) -> dict[str, float]:
    n, dim = vectors.shape
    print(f"\nwrite path: {n} x {dim}-d vectors from the model, {batch} rows per transaction")
    # Warm up catalog caches and prepared statements on both paths.
    fresh_collection(store, url, "bench_warm", dim, hnsw=False)
    write_path(store, "bench_warm", vectors[: 2 * batch], batch)
    raw_copy(url, vectors[: 2 * batch], batch)
    rates: dict[str, float] = {}
    for hnsw in (True, False):
        suffix = "+hnsw" if hnsw else ""
        name = "bench_wp_hnsw" if hnsw else "bench_wp_plain"
        rates[f"raw{suffix}"] = timed(
            f"raw-copy{suffix}", n, partial(raw_copy, url, vectors, batch, hnsw=hnsw), repeat
        )
        rates[f"write{suffix}"] = timed(
            f"write-path{suffix}",
            n,
            partial(write_path, store, name, vectors, batch),
            repeat,
            setup=partial(fresh_collection, store, url, name, dim, hnsw),
        )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_raw")
    for name in ("bench_warm", "bench_wp_hnsw", "bench_wp_plain"):
        store.drop_collection(name)
    return rates


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--records-per-event", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="MAX_BATCH_SIZE")
    parser.add_argument(
        "--depth",
        type=int,
        default=Settings().embed_pipeline_depth,
        help="FORGE_EMBED_PIPELINE_DEPTH: model batches per read (1: no overlap)",
    )
    parser.add_argument(
        "--reads-in-flight",
        type=int,
        default=Settings().embed_reads_in_flight,
        help="FORGE_EMBED_READS_IN_FLIGHT: reads one worker holds at once (1: no overlap"
        " across reads)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's, one per core); with 1 on a 2-core"
        " machine the database has a core of its own, as on a separate server",
    )
    parser.add_argument("--hnsw-m", type=int, default=Settings().hnsw_m, help="FORGE_HNSW_M")
    parser.add_argument(
        "--hnsw-ef-construction",
        type=int,
        default=Settings().hnsw_ef_construction,
        help="FORGE_HNSW_EF_CONSTRUCTION (the write path is compared on pgvector's defaults)",
    )
    parser.add_argument("--postgres-url", default=None, help="default: embedded, temporary")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile the last pipeline run")
    parser.add_argument("--skip-write-path", action="store_true")
    parser.add_argument(
        "--skip-no-index", action="store_true", help="skip the pipeline run without HNSW index"
    )
    args = parser.parse_args()

    with postgres_server(args.postgres_url) as (home, url, pgdata):
        run_all(args, url, home, ServerCpu(pgdata))


def run_all(args: argparse.Namespace, url: str, home: Path, server_cpu: ServerCpu) -> None:
    import torch

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    texts = make_texts(args.events * args.records_per_event)
    embedder = Embedder.load()
    model: Any = embedder.model
    embedder.encode(make_texts(WARMUP_TEXTS, seed=1), args.batch_size)  # warm-up
    admin = redis.Redis.from_url(args.redis_url)
    server = admin.info("server")["redis_version"]
    words = sum(len(t.split()) for t in texts) / len(texts)
    print(
        f"{args.events} events x {args.records_per_event} record(s): {len(texts)} distinct"
        f" texts of {words:.1f} words on average; batch size {args.batch_size},"
        f" pipeline depth {args.depth}, {args.reads_in_flight} read(s) in flight"
    )
    print(
        f"model {embedder.name} on {embedder.device} (torch {torch.__version__},"
        f" {torch.get_num_threads()} intra-op threads); Redis {server}; {args.repeat} repeat(s)"
    )
    root = f"bench:{uuid.uuid4().hex[:12]}:"
    results = Results(len(texts))
    vectors = np.empty((0, embedder.dimension), dtype=np.float32)
    profile = cProfile.Profile() if args.profile else None
    variants = [("pipeline", True)]
    if not args.skip_no_index:
        variants.append(("pipeline, no index", False))
    try:
        index = Settings(hnsw_m=args.hnsw_m, hnsw_ef_construction=args.hnsw_ef_construction)
        with VectorStore.from_settings(url, index) as store:
            print(
                f"{server_versions(url)}; HNSW m {args.hnsw_m}, ef_construction"
                f" {args.hnsw_ef_construction}"
            )
            for run in range(args.repeat):
                for name, per_batch in (("bare encode", False), ("bare encode, per batch", True)):
                    with CpuMeter(server_cpu) as cpu:
                        vectors, seconds = bare_encode(model, texts, args.batch_size, per_batch)
                    results.add(run, name, sum(seconds), seconds, f"  ({cpu.describe()})")
                for name, hnsw in variants:
                    prefix = f"{root}{run}-{int(hnsw)}:"
                    last = run == args.repeat - 1 and hnsw
                    with CpuMeter(server_cpu) as cpu:
                        result = run_pipeline(
                            args,
                            embedder,
                            store,
                            url,
                            prefix,
                            texts,
                            vectors,
                            home,
                            profile if last else None,
                            hnsw=hnsw,
                        )
                    delete_prefix(admin, prefix)
                    extra = result.describe(len(texts), cpu.describe())
                    results.add(run, name, result.wall_s, result.batch_s, extra)
                    results.add_encode(name, result.encode_s)
            if profile is not None:
                print_profile(profile)
            rates: dict[str, float] = {}
            if not args.skip_write_path:
                batch = args.batch_size * args.records_per_event
                # pgvector's default index on both sides, whatever the pipeline used.
                with VectorStore(url) as plain:
                    rates = write_comparison(url, plain, vectors, batch, args.repeat)
    finally:
        delete_prefix(admin, root)
        admin.close()
    results.summarise(rates)


def server_versions(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        server = conn.execute("SHOW server_version").fetchone()
        vector = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        ).fetchone()
    return f"PostgreSQL {server[0] if server else '?'}, pgvector {vector[0] if vector else '?'}"


class Results:
    """Per variant: the best run, and per batch the fastest of the repeats."""

    def __init__(self, sentences: int) -> None:
        self.sentences = sentences
        self.best_s: dict[str, float] = {}
        self.batches: dict[str, list[list[float]]] = {}
        self.encodes: dict[str, list[list[float]]] = {}

    def add(
        self, run: int, name: str, wall_s: float, batch_s: list[float], extra: str = ""
    ) -> None:
        self.best_s[name] = min(self.best_s.get(name, float("inf")), wall_s)
        self.batches.setdefault(name, []).append(batch_s)
        rate = self.sentences / wall_s
        print(f"  run {run + 1}  {name:<24} {rate:>9,.1f} sentences/s{extra}", flush=True)

    def add_encode(self, name: str, encode_s: list[float]) -> None:
        self.encodes.setdefault(name, []).append(encode_s)

    def rate(self, name: str) -> float:
        return self.sentences / self.best_s[name]

    def filtered(self, name: str, source: dict[str, list[list[float]]] | None = None) -> float:
        """Sentences/s from the sum over batches of each batch's fastest repeat: the same
        work in every repeat (batch k holds the same texts and, for the pipeline, meets
        the same collection size), so this discards bursts of load from other processes."""
        runs = (source or self.batches).get(name, [])
        if not runs or not all(runs) or len({len(r) for r in runs}) != 1:
            return float("nan")
        fastest = [min(column) for column in zip(*runs, strict=True)]
        return self.sentences / float(sum(fastest))

    def summarise(self, rates: dict[str, float]) -> None:
        print("\nsentences/s: best run | per-batch minima over the repeats (noise-filtered)")
        for name in self.best_s:
            value = self.filtered(name)
            filtered = "" if name == "bare encode" or math.isnan(value) else f"{value:>9,.1f}"
            print(f"  {name:<34} {self.rate(name):>9,.1f} | {filtered}")
        for name in self.encodes:
            print(
                f"  {'  model inside ' + name:<34} {'':>9} |"
                f" {self.filtered(name, self.encodes):>9,.1f}"
            )
        bare, per_batch = self.rate("bare encode"), self.filtered("bare encode, per batch")
        pipeline, pipeline_filtered = self.rate("pipeline"), self.filtered("pipeline")
        print(
            f"pipeline / bare encode = {pipeline / bare:.2f}x best runs (target >= 0.9);"
            f" {_ratio(pipeline_filtered, per_batch)} per-batch minima (vs bare per batch)"
        )
        if "pipeline, no index" in self.best_s:
            plain, plain_filtered = (
                self.rate("pipeline, no index"),
                self.filtered("pipeline, no index"),
            )
            print(
                f"pipeline without the HNSW index (diagnostic) / bare encode ="
                f" {plain / bare:.2f}x best runs;"
                f" {_ratio(plain_filtered, per_batch)} per-batch minima"
            )
        if not rates:
            return
        # The same work by hand: bare encode, then a raw COPY of the vectors, back to back.
        by_hand = 1 / (1 / bare + 1 / rates["raw+hnsw"])
        by_hand_filtered = 1 / (1 / per_batch + 1 / rates["raw+hnsw"])
        print(
            f"bare encode, then raw COPY with HNSW: {by_hand:,.1f} sentences/s best runs,"
            f" {by_hand_filtered:,.1f} with per-batch minima; pipeline / that ="
            f" {pipeline / by_hand:.2f}x, {_ratio(pipeline_filtered, by_hand_filtered)}"
        )
        print("\nrows/s, best run:")
        print(
            f"  with HNSW: write-path {rates['write+hnsw']:>9,.0f}  raw COPY"
            f" {rates['raw+hnsw']:>9,.0f}  write-path / raw COPY ="
            f" {rates['write+hnsw'] / rates['raw+hnsw']:.2f}x (target >= 0.8)"
        )
        print(
            f"  no index:  write-path {rates['write']:>9,.0f}  raw COPY {rates['raw']:>9,.0f}"
            f"  write-path / raw COPY = {rates['write'] / rates['raw']:.2f}x (secondary)"
        )


def print_profile(profile: cProfile.Profile) -> None:
    stats = pstats.Stats(profile)
    print("\ncProfile of the last pipeline run, top 25 by internal time:")
    stats.sort_stats("tottime").print_stats(25)
    print("Forge's own code and its clients, top 40 by cumulative time:")
    stats.sort_stats("cumulative").print_stats(r"forge|consumers|psycopg|redis", 40)


def _ratio(a: float, b: float) -> str:
    """``a / b``, or n/a where ``a`` has no per-batch figure (reads in flight overlap)."""
    return "n/a" if math.isnan(a) else f"{a / b:.2f}x"


if __name__ == "__main__":
    main()
