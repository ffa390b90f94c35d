"""Soak run: a steady mixed load for minutes; latency, throughput, memory, backpressure.

    .venv/bin/python bench/soak.py [--rate 200] [--duration-s 600] [--workers 2]
        [--text-share 0.02] [--poison-share 0.002] [--warmup-s 60] [--seed 1]
        [--dir PATH] [--keep]

Starts its own servers (as ``bench/chaos.py``: a redis-server with AOF, an embedded
PostgreSQL with pgvector, both in a fresh folder) and ``--workers`` ``forge worker``
processes with the real handlers, then publishes ``--rate`` new-data events per second
for ``--duration-s`` seconds: mostly 8-d vector records, a ``--text-share`` of one-line
texts the model embeds (all-MiniLM-L6-v2, 384-d, into a second collection; some texts
repeat, so the embedding cache is used too) and a ``--poison-share`` of poison entries.

Measured, over the events published after ``--warmup-s`` (model loaded, caches warm):

* throughput: completions per second;
* event-to-completion latency, p50 / p99 / max: the completion's ``created_at`` minus
  the input entry id's timestamp (both from this machine's clock);
* worker RSS (psutil) right after the warm-up and at the end of the load: growth
  must stay under 10% (``--max-rss-growth``);
* backpressure: XINFO CONSUMERS sampled every ``--sample-s``; no consumer may hold
  more unacknowledged entries than ``max(4 x MAX_BATCH_SIZE, 16) + MAX_BATCH_SIZE``
  (the redelivery backlog ``forge/runtime/sources.py`` allows plus the batch in flight).

Then it drains, stops the workers with SIGTERM and runs the chaos run's checks (one
completion per event, poison dead-lettered, nothing pending, every record stored once,
no process left). Prints PASS/FAIL per check; exit status 1 if any fails.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from bench._checks import Check
from bench._common import GROUP, MODEL, TEXT_DIM, log
from bench._harness import (
    Harness,
    RunReport,
    add_run_options,
    print_report,
    run_folder,
    run_supervised,
)
from bench._workers import Workers, WorkerSettings, rss_bytes, start_workers
from bench._workload import (
    CompletionReader,
    Ledger,
    Planned,
    Workload,
    drain,
    latency_s,
    percentile,
)
from forge.keys import Keys

VECTOR_COLLECTION = "soak_vectors"
TEXT_COLLECTION = "soak_texts"
MB = 1024 * 1024


@dataclass
class SoakConfig:
    rate: float = 200.0
    duration_s: float = 600.0
    warmup_s: float | None = None  # default: a fifth of the duration, at most 60 s
    workers: int = 2
    text_share: float = 0.02
    poison_share: float = 0.002
    max_batch_size: int = 32
    embed_pipeline_depth: int = 8
    sample_s: float = 0.5
    max_rss_growth: float = 0.10
    drain_timeout_s: float = 180.0
    dim: int = 8
    seed: int = 1
    root: Path | None = None
    keep: bool = False

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(60.0, self.duration_s / 5)

    @property
    def pending_bound(self) -> int:
        """forge/runtime/sources.py: reads stop at ``_max_waiting`` entries awaiting redelivery;
        add the batch in flight (a new-data read holds ``embed_pipeline_depth`` model
        batches, see consumers/__init__.py)."""
        batch = self.embed_pipeline_depth * self.max_batch_size
        return max(4 * batch, 16) + batch


@dataclass
class SoakReport(RunReport):
    config: SoakConfig
    published: int = 0
    steady_events: int = 0  # events published after the warm-up
    steady_completed: int = 0  # completions created after the warm-up, before the load ended
    steady_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    text_latencies: list[float] = field(default_factory=list)
    handler_s: list[float] = field(default_factory=list)  # per completion: its batch's
    rss_start: dict[int, int] = field(default_factory=dict)
    rss_end: dict[int, int] = field(default_factory=dict)
    max_pending: int = 0
    max_pending_consumer: str = ""
    samples: int = 0

    @property
    def throughput(self) -> float:
        return self.steady_completed / self.steady_s if self.steady_s > 0 else 0.0

    def rss_growth(self) -> dict[int, float]:
        return {
            pid: self.rss_end[pid] / start - 1
            for pid, start in self.rss_start.items()
            if pid in self.rss_end and start
        }

    def table(self) -> list[tuple[str, str]]:
        lat, text = self.latencies, self.text_latencies
        growth = self.rss_growth()
        rows = [
            ("rate (target)", f"{self.config.rate:g} events/s"),
            ("duration / warm-up", f"{self.config.duration_s:g} s / {self.config.warmup:g} s"),
            ("workers", str(self.config.workers)),
            ("entries published", f"{self.published:,}"),
            ("steady-state events", f"{self.steady_events:,}"),
            ("throughput (steady)", f"{self.throughput:,.1f} completions/s"),
            ("latency p50", f"{percentile(lat, 50) * 1000:,.1f} ms"),
            ("latency p99", f"{percentile(lat, 99) * 1000:,.1f} ms"),
            ("latency max", f"{max(lat, default=float('nan')) * 1000:,.1f} ms"),
            ("text events p50 / p99", _ms_pair(text)),
            ("handler time p50 / p99", _ms_pair(self.handler_s)),
            ("max pending per consumer", f"{self.max_pending} (bound {self.config.pending_bound})"),
        ]
        for pid, start in sorted(self.rss_start.items()):
            end = self.rss_end.get(pid, 0)
            change = f"{growth[pid] * 100:+.1f}%" if pid in growth else "?"
            rows.append((f"worker {pid} RSS", f"{start / MB:,.0f} -> {end / MB:,.0f} MB {change}"))
        return rows


def _ms_pair(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{percentile(values, 50) * 1000:,.0f} / {percentile(values, 99) * 1000:,.0f} ms"


def run_soak(cfg: SoakConfig) -> SoakReport:
    report = SoakReport(cfg, root=run_folder(cfg.root, "soak"))
    run_supervised(report, partial(_run, cfg, report), keep=cfg.keep)
    return report


def _run(cfg: SoakConfig, report: SoakReport, harness: Harness, started: list[Workers]) -> None:
    harness.store.ensure_collection(VECTOR_COLLECTION, cfg.dim, MODEL)
    harness.store.ensure_collection(TEXT_COLLECTION, TEXT_DIM, MODEL)
    settings = WorkerSettings(
        max_batch_size=cfg.max_batch_size, embed_pipeline_depth=cfg.embed_pipeline_depth
    )
    workers = start_workers(settings, harness.servers, report.root, cfg.workers, started)
    log(f"{cfg.workers} workers serving; {cfg.rate:g} events/s for {cfg.duration_s:g} s")

    load_end = _load(cfg, report, workers, harness)
    drained = drain(harness.reader, harness.ledger, workers, cfg.drain_timeout_s)
    report.checks.append(harness.drained(drained, cfg.drain_timeout_s))
    _measure(cfg, report, harness.ledger, harness.reader, load_end)
    codes = workers.stop(timeout_s=60)
    report.checks.append(
        Check(
            "every worker drained and exited 0 on SIGTERM",
            all(code == 0 for code in codes) and not workers.crashes,
            f"exit codes {sorted(set(codes))}; crashes: {workers.crashes or 'none'}",
        )
    )
    report.verification = harness.verify()


def _load(cfg: SoakConfig, report: SoakReport, workers: Workers, harness: Harness) -> float:
    """Publish at the fixed rate for the duration, sampling pending counts and RSS;
    returns the wall-clock time the load ended."""
    ledger, reader = harness.ledger, harness.reader
    workload = Workload(cfg.seed, VECTOR_COLLECTION, cfg.dim, TEXT_COLLECTION)
    rng = random.Random(cfg.seed + 1)
    start = time.monotonic()
    report.steady_s = cfg.duration_s - cfg.warmup
    warm_at = start + cfg.warmup
    next_sample = next_note = start
    sent = 0
    while (now := time.monotonic()) < start + cfg.duration_s:
        due = int((now - start) * cfg.rate) + 1
        if due > sent:
            ledger.publish([_pick(workload, rng, cfg) for _ in range(due - sent)])
            sent = due
        if now >= next_sample:
            next_sample = now + cfg.sample_s
            _sample_pending(report, harness.client, harness.keys)
            if not report.rss_start and now >= warm_at:
                report.rss_start = rss_bytes(workers.pids())
                log(f"warm: RSS {_mb(report.rss_start)}")
            workers.reap()
        if now >= next_note:
            next_note = now + 15.0
            reader.poll()
            done = reader.finished(ledger.entries)
            log(f"{now - start:5.0f} s: published {sent:,}, completed {done:,}")
        time.sleep(0.005)
    report.rss_end = rss_bytes(workers.pids())
    log(f"load over: RSS {_mb(report.rss_end)}")
    report.published = sent
    return time.time()


def _pick(workload: Workload, rng: random.Random, cfg: SoakConfig) -> Planned:
    roll = rng.random()
    if roll < cfg.poison_share:
        return workload.poison_event()
    if roll < cfg.poison_share + cfg.text_share:
        return workload.text_event()
    return workload.vector_event()


def _sample_pending(report: SoakReport, client: redis.Redis, keys: Keys) -> None:
    """Unacknowledged entries per consumer right now (XINFO CONSUMERS)."""
    report.samples += 1
    consumers: Any = client.xinfo_consumers(keys.new_data, GROUP)
    for consumer in consumers:
        if int(consumer["pending"]) > report.max_pending:
            report.max_pending = int(consumer["pending"])
            name = consumer["name"]
            report.max_pending_consumer = name.decode() if isinstance(name, bytes) else str(name)


def _measure(
    cfg: SoakConfig, report: SoakReport, ledger: Ledger, reader: CompletionReader, load_end: float
) -> None:
    load_start = load_end - cfg.duration_s
    warm_from = load_start + cfg.warmup
    report.steady_completed = sum(
        1
        for done in reader.by_entry.values()
        for c in done
        if c.created_at is not None and warm_from <= c.created_at.timestamp() <= load_end
    )
    for entry_id, planned in ledger.entries.items():
        if ledger.published_at[entry_id] < warm_from or planned.poison:
            continue
        for completion in reader.by_entry.get(entry_id, [])[:1]:
            report.steady_events += 1
            report.latencies.append(latency_s(completion))
            report.handler_s.append(completion.timings.handler_s)
            if planned.kind == "text":
                report.text_latencies.append(latency_s(completion))
    growth = report.rss_growth()
    worst = max(growth.values(), default=float("nan"))
    report.checks.append(
        Check(
            f"worker memory flat once warm (RSS growth < {cfg.max_rss_growth:.0%})",
            bool(growth) and len(growth) == len(report.rss_start) and worst < cfg.max_rss_growth,
            f"worst {worst * 100:+.1f}% over {len(growth)} workers",
        )
    )
    report.checks.append(
        Check(
            "backpressure: no consumer held more than the bound",
            report.max_pending <= cfg.pending_bound,
            f"max {report.max_pending} unacked ({report.max_pending_consumer}) over "
            f"{report.samples} samples; bound {cfg.pending_bound}",
        )
    )
    report.checks.append(
        Check(
            "kept up with the rate (steady throughput >= 95% of it)",
            report.throughput >= 0.95 * cfg.rate,
            f"{report.throughput:,.1f} completions/s for {cfg.rate:g} events/s published",
        )
    )
    if report.latencies:
        log(f"latency mean {statistics.fmean(report.latencies) * 1000:.1f} ms")


def _mb(sizes: dict[int, int]) -> str:
    return ", ".join(f"{pid}: {size / MB:,.0f} MB" for pid, size in sorted(sizes.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    d = SoakConfig()
    parser.add_argument("--rate", type=float, default=d.rate, help="events/s published")
    parser.add_argument("--duration-s", type=float, default=d.duration_s)
    parser.add_argument("--warmup-s", type=float, default=None, help="default duration/5, <=60")
    parser.add_argument("--workers", type=int, default=d.workers)
    parser.add_argument("--text-share", type=float, default=d.text_share)
    parser.add_argument("--poison-share", type=float, default=d.poison_share)
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    parser.add_argument(
        "--embed-pipeline-depth", type=int, default=d.embed_pipeline_depth, help="per worker"
    )
    parser.add_argument("--sample-s", type=float, default=d.sample_s)
    parser.add_argument("--max-rss-growth", type=float, default=d.max_rss_growth)
    add_run_options(parser, drain_timeout_s=d.drain_timeout_s, seed=d.seed)
    args = parser.parse_args(argv)
    cfg = SoakConfig(
        rate=args.rate,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        workers=args.workers,
        text_share=args.text_share,
        poison_share=args.poison_share,
        max_batch_size=args.max_batch_size,
        embed_pipeline_depth=args.embed_pipeline_depth,
        sample_s=args.sample_s,
        max_rss_growth=args.max_rss_growth,
        drain_timeout_s=args.drain_timeout_s,
        seed=args.seed,
        root=args.dir,
        keep=args.keep,
    )
    return print_report("soak", run_soak(cfg), keep=cfg.keep)


if __name__ == "__main__":
    raise SystemExit(main())
