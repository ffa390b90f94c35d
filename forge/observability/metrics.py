"""Prometheus metrics: Forge's instruments, and scrape-time collectors. The runtime
updates its instruments through ``runtime_metrics.PrometheusObserver``, handlers theirs.

Every ``Metrics`` owns its own ``CollectorRegistry`` (never the global one), so tests
and embedded uses can build as many as they like. ``stream`` labels carry short stream
names (``Keys.short``), e.g. ``new-data``.

Multi-process mode (``forge worker --processes N``)
----------------------------------------------------
prometheus_client decides *once*, when ``prometheus_client.values`` is first imported,
whether instruments keep their values in memory or in per-process mmap files under
``$PROMETHEUS_MULTIPROC_DIR``. So the parent process, which serves HTTP, wires it as::

    metrics_dir = prepare_multiprocess_dir(settings.home_dir / "run" / "metrics")
    env = multiprocess_env(metrics_dir)  # os.environ + PROMETHEUS_MULTIPROC_DIR
    child = subprocess.Popen([sys.executable, "-m", "forge", "worker", ...], env=env)
    parent = Metrics()                   # scrape-time collectors live here
    parent.watch_streams(client_factory, keys, keys.input_streams)
    serve = functools.partial(render_multiprocess, metrics_dir, parent)
    ...
    mark_worker_dead(metrics_dir, child.pid)  # whenever a child exits

* Children must be fresh interpreters that get the variable in their environment
  before they import prometheus_client: ``subprocess`` with ``env=``, or
  ``multiprocessing`` with the *spawn* context after setting
  ``os.environ[MULTIPROC_DIR_ENV]`` in the parent (what ``forge.runtime.supervisor`` does).
  Not *fork*: a forked child inherits the parent's in-memory value class and its
  metrics would never reach the files.
* Children build ``Metrics`` as usual and serve nothing. Their scrape-time collectors
  are never scraped (the files hold instruments only), so stream and GPU stats must
  come from the ``parent`` passed to ``render_multiprocess``.
* The directory must be emptied before the children start, or a previous run's
  counters are added in (``prepare_multiprocess_dir`` does that).
* ``render_multiprocess`` sums the children's files and adds the parent's own
  metrics, whichever mode the parent itself ended up in.
* Every gauge uses a ``live*`` mode (``events_in_progress`` ``livesum``, the latest
  values ``livemostrecent``): dead children drop out once ``mark_worker_dead`` has run
  (``forge.runtime.supervisor`` for ``forge worker --processes``,
  ``forge.serving.server`` for ``forge serve --workers``). Counters and histograms of
  dead children are kept, as Prometheus expects of counters.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import redis
import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from forge.keys import Keys
from forge.observability.nvml import Nvml
from forge.observability.serving_metrics import ServingMetrics
from forge.observability.status import Snapshot, snapshot
from forge.observability.training_metrics import TrainingQueueMetrics

log = structlog.get_logger(__name__)

Outcome = Literal["succeeded", "failed", "dead-lettered", "duplicate"]
DeadLetterReason = Literal["invalid", "max-deliveries"]
OUTCOMES: tuple[Outcome, ...] = ("succeeded", "failed", "dead-lettered", "duplicate")
DEAD_LETTER_REASONS: tuple[DeadLetterReason, ...] = ("invalid", "max-deliveries")

# 1 ms (a cache hit) to 1 h (the default training timeout).
HANDLER_DURATION_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
)  # fmt: skip
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

RedisClientFactory = Callable[[], redis.Redis]


class Metrics:
    """Forge's instruments, registered in a private registry."""

    events_received_total: Counter
    events_processed_total: Counter
    retries_total: Counter
    dead_lettered_total: Counter
    redeliveries_total: Counter
    reclaimed_total: Counter
    handler_duration_seconds: Histogram
    events_in_progress: Gauge
    infrastructure_errors_total: Counter
    embedding_cache_hits_total: Counter
    embedding_cache_misses_total: Counter
    training_progress_ratio: Gauge
    training_loss: Gauge

    def __init__(self, *, gpu: bool = True) -> None:
        self.registry = CollectorRegistry()
        self._scrape_collectors: list[Collector] = []
        self._define_event_metrics()
        self._define_support_metrics()
        self.serving = ServingMetrics(self.registry)
        self.training_queue = TrainingQueueMetrics(self.registry)
        if gpu:
            self.add_collector(GpuCollector())

    def _counter(self, name: str, doc: str, *labels: str) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def _define_event_metrics(self) -> None:
        c = self._counter
        self.events_received_total = c("forge_events_received_total", "Entries read.", "stream")
        self.events_processed_total = c(
            "forge_events_processed_total", "Entries that reached an outcome.", "stream", "outcome"
        )
        self.retries_total = c("forge_retries_total", "In-process handler retries.", "stream")
        self.dead_lettered_total = c(
            "forge_dead_lettered_total", "Entries dead-lettered.", "stream", "reason"
        )
        self.redeliveries_total = c(
            "forge_redeliveries_total", "Entries delivered again.", "stream"
        )
        self.reclaimed_total = c(
            "forge_reclaimed_total", "Entries claimed from idle consumers.", "stream"
        )
        self.handler_duration_seconds = Histogram(
            "forge_handler_duration_seconds",
            "Time spent in an event handler.",
            ["stream"],
            buckets=HANDLER_DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.events_in_progress = Gauge(
            "forge_events_in_progress",
            "Entries being handled right now.",
            ["stream"],
            multiprocess_mode="livesum",
            registry=self.registry,
        )

    def _define_support_metrics(self) -> None:
        c = self._counter
        self.infrastructure_errors_total = c(
            "forge_infrastructure_errors_total", "Failures of a backing service.", "component"
        )
        self.embedding_cache_hits_total = c(
            "forge_embedding_cache_hits_total", "Embeddings served from cache.", "model"
        )
        self.embedding_cache_misses_total = c(
            "forge_embedding_cache_misses_total", "Embeddings computed.", "model"
        )
        # The progress stream carries the full curve; these give dashboards the latest
        # point without reading Redis.
        self.training_progress_ratio = Gauge(
            "forge_training_progress_ratio",
            "Epochs done over epochs planned, of the model's latest training.",
            ["model"],
            multiprocess_mode="livemostrecent",
            registry=self.registry,
        )
        self.training_loss = Gauge(
            "forge_training_loss",
            "Loss of the model's latest training epoch.",
            ["model"],
            multiprocess_mode="livemostrecent",
            registry=self.registry,
        )

    def init_streams(self, streams: Iterable[str]) -> None:
        """Create every per-stream series at zero, so ``rate()`` works from the start."""
        for stream in streams:
            for metric in (self.events_received_total, self.retries_total, self.redeliveries_total):
                metric.labels(stream=stream)
            self.reclaimed_total.labels(stream=stream)
            self.events_in_progress.labels(stream=stream)
            for outcome in OUTCOMES:
                self.events_processed_total.labels(stream=stream, outcome=outcome)
            for reason in DEAD_LETTER_REASONS:
                self.dead_lettered_total.labels(stream=stream, reason=reason)

    def add_collector(self, collector: Collector) -> None:
        """Register a scrape-time collector (kept apart for ``render_multiprocess``)."""
        self.registry.register(collector)
        self._scrape_collectors.append(collector)

    def watch_streams(
        self, redis_client_factory: RedisClientFactory, keys: Keys, streams: Iterable[str]
    ) -> StreamStatsCollector:
        """Report consumer-group stats of ``streams`` at every scrape."""
        collector = StreamStatsCollector(
            redis_client_factory, keys, streams, errors=self.infrastructure_errors_total
        )
        self.add_collector(collector)
        return collector

    @property
    def scrape_collectors(self) -> tuple[Collector, ...]:
        return tuple(self._scrape_collectors)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class StreamStatsCollector:
    """Reads what ``forge status`` shows (``observability.status``) at scrape time;
    never raises.

    That includes the dead-letter replay count: replays are made by ``forge dlq
    replay``, a process Prometheus never scrapes, so the count is Redis's, reported as
    a counter (every scraped process reports the same total: aggregate with ``max``).

    ``redis_client_factory`` is called on every scrape and should return a shared
    client with a short socket timeout: a scrape waits for Redis.
    """

    def __init__(
        self,
        redis_client_factory: RedisClientFactory,
        keys: Keys,
        streams: Iterable[str],
        *,
        errors: Counter | None = None,
    ) -> None:
        self._client_factory = redis_client_factory
        self._keys = keys
        self._streams = tuple(streams)
        self._errors = errors
        self._failing = False

    def collect(self) -> Iterator[Metric]:
        try:
            snap = snapshot(self._client_factory(), self._keys, self._streams)
        # Anything at all: a failing scrape would hide every other metric.
        except Exception as exc:
            self._on_failure(exc)
            return
        self._failing = False
        yield from self._families(snap)

    def _families(self, snap: Snapshot) -> Iterator[Metric]:
        length = GaugeMetricFamily(
            "forge_stream_length", "Entries in the stream.", labels=["stream"]
        )
        group_labels = ["stream", "group"]
        lag = GaugeMetricFamily(
            "forge_stream_lag", "Entries not yet delivered to the group.", labels=group_labels
        )
        pending = GaugeMetricFamily(
            "forge_stream_pending", "Entries delivered, not acknowledged.", labels=group_labels
        )
        consumers = GaugeMetricFamily(
            "forge_stream_consumers", "Consumers in the group.", labels=group_labels
        )
        for status in snap.streams:
            label = self._keys.short(status.stream)
            length.add_metric([label], status.length)
            for group in status.groups:
                # None when Redis 7 cannot tell (entries deleted mid-stream) or a Redis 6.2
                # backlog is too long to count (observability.status): no sample beats a
                # guess.
                if group.lag is not None:
                    lag.add_metric([label, group.name], group.lag)
                pending.add_metric([label, group.name], group.pending)
                consumers.add_metric([label, group.name], group.consumers)
        yield from (length, lag, pending, consumers)
        yield GaugeMetricFamily(
            "forge_dead_letter_depth",
            "Entries in the dead-letter stream.",
            value=snap.dead_letter_depth,
        )
        yield CounterMetricFamily(
            "forge_dead_letter_replays_total",
            "Dead letters replayed, by any process (Redis's count).",
            value=snap.dead_letter_replays,
        )

    def _on_failure(self, exc: Exception) -> None:
        if self._errors is not None:
            self._errors.labels(component="redis").inc()
        # Warn once per outage; Prometheus scrapes every few seconds.
        report = log.debug if self._failing else log.warning
        report("stream stats unavailable", error=f"{type(exc).__name__}: {exc}")
        self._failing = True


class GpuCollector:
    """GPU utilisation and memory via NVML; emits nothing where NVML is unavailable.

    NVML is initialised on the first scrape, and tried once (``Nvml``).
    """

    def __init__(self, nvml: Any = None) -> None:
        # ``nvml`` replaces the ``pynvml`` module in tests.
        self._nvml = Nvml(nvml, "GPU metrics")

    def collect(self) -> Iterator[Metric]:
        nvml = self._nvml.get()
        if nvml is None:
            return
        util = GaugeMetricFamily("forge_gpu_utilization_ratio", "GPU busy ratio.", labels=["gpu"])
        used = GaugeMetricFamily("forge_gpu_memory_used_bytes", "GPU memory used.", labels=["gpu"])
        total = GaugeMetricFamily("forge_gpu_memory_total_bytes", "GPU memory.", labels=["gpu"])
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                util.add_metric([str(index)], rates.gpu / 100.0)
                used.add_metric([str(index)], float(memory.used))
                total.add_metric([str(index)], float(memory.total))
        except Exception as exc:  # a GPU fell off the bus: skip this scrape, keep others
            log.debug("gpu stats unavailable", error=f"{type(exc).__name__}: {exc}")
            return
        yield from (util, used, total)


# ------------------------------------------------------------------ multi-process mode


def prepare_multiprocess_dir(path: Path) -> Path:
    """Create ``path`` and delete metric files a previous run left there."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)
    return path


def multiprocess_env(multiproc_dir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child worker: ``base`` (default ``os.environ``) plus the dir."""
    env = dict(os.environ if base is None else base)
    env[MULTIPROC_DIR_ENV] = str(multiproc_dir)
    return env


def mark_worker_dead(multiproc_dir: Path, pid: int) -> None:
    """Drop a dead child's ``live*`` gauges (its in-progress count) from the sums."""
    multiprocess.mark_process_dead(pid, str(multiproc_dir))  # type: ignore[no-untyped-call]


def in_multiprocess_mode() -> bool:
    """True when this process's instruments write to ``$PROMETHEUS_MULTIPROC_DIR``."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def render_multiprocess(multiproc_dir: Path, parent: Metrics | None = None) -> tuple[bytes, str]:
    """Exposition of every child's metrics in ``multiproc_dir`` plus ``parent``'s own."""
    files = multiprocess.MultiProcessCollector(None, path=str(multiproc_dir))  # type: ignore[no-untyped-call]
    sources: list[Collector] = [files]
    if parent is not None and in_multiprocess_mode():
        # The parent's instruments are in the files already; only add what is computed.
        sources.extend(parent.scrape_collectors)
    elif parent is not None:
        sources.append(parent.registry)
    return generate_latest(_MergedCollector(sources)), CONTENT_TYPE_LATEST


class _MergedCollector:
    """Joins families of the same name from several sources, summing equal series.

    The parent and the children both count e.g. ``forge_infrastructure_errors_total``;
    two families of one name would make the exposition invalid.
    """

    def __init__(self, sources: Sequence[Collector]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
        for source in self._sources:
            for family in source.collect():
                families.setdefault(family.name, family)
                merged = samples.setdefault(family.name, {})
                for sample in family.samples:
                    # Multi-process files carry no creation time; mixed ones would mislead.
                    if sample.name.endswith("_created"):
                        continue
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    seen = merged.get(key)
                    value = sample.value + (seen.value if seen else 0.0)
                    merged[key] = Sample(sample.name, sample.labels, value)
        for name, family in families.items():
            family.samples = list(samples[name].values())
            yield family
