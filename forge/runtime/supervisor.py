"""``forge worker --processes N``: N worker processes under one supervisor.

The supervisor serves ``/health`` and ``/metrics`` for all of them (prometheus-client's
multi-process mode: children write their metrics to files the parent aggregates),
restarts a child that dies, and forwards SIGTERM/SIGINT so each child drains. Children
run in their own process group, so a terminal's Ctrl-C reaches them once, through the
supervisor, and they get SIGTERM if the supervisor itself dies.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from multiprocessing.context import SpawnProcess
from multiprocessing.sharedctypes import SynchronizedArray
from types import FrameType

import structlog

from forge.keys import Keys
from forge.observability.http import HealthReport, start_http_server
from forge.observability.logging import configure_logging
from forge.observability.metrics import (
    MULTIPROC_DIR_ENV,
    Metrics,
    mark_worker_dead,
    prepare_multiprocess_dir,
    render_multiprocess,
)
from forge.runtime.serve import serve_worker
from forge.servers.connect import connect_redis, connect_redis_probe
from forge.servers.proc import die_with_parent
from forge.settings import Settings

log = structlog.get_logger(__name__)
_RESTART_BACKOFF_MAX_S = 30.0


def _child_main(
    settings: Settings,
    streams: Sequence[str],
    consumers: Sequence[str],
    index: int,
    beats: SynchronizedArray[float],
) -> None:

    os.setpgid(0, 0)
    die_with_parent(signal.SIGTERM)
    configure_logging(settings)
    assert settings.redis_url is not None

    def beat() -> None:
        beats[index] = time.time()

    serve_worker(
        settings,
        connect_redis(settings.redis_url, cluster=settings.redis_cluster),
        streams,
        consumers,
        heartbeat=beat,
    )


class Supervisor:
    def __init__(
        self, settings: Settings, streams: Sequence[str], consumers: Sequence[str], processes: int
    ) -> None:
        self.settings = settings
        self.streams = list(streams)
        self.consumers = list(consumers)
        self.processes = processes
        self._mp = multiprocessing.get_context("spawn")
        self._beats: SynchronizedArray[float] = self._mp.Array("d", processes)
        self._children: list[SpawnProcess | None] = [None] * processes
        self._restarts = [0] * processes
        self._signals = 0
        self._metrics_dir = settings.home_dir / "metrics" / str(os.getpid())
        self._redis = connect_redis_probe(settings.redis_url or "", cluster=settings.redis_cluster)
        # Children's instruments arrive through files; what is read from Redis at scrape
        # time (lag, pending, dead-letter depth) and from the GPU is the parent's to report.
        self._metrics = Metrics()
        keys = Keys.from_settings(settings)
        # All input streams, as a single-process worker reports (see serve_worker).
        self._metrics.watch_streams(lambda: self._redis, keys, keys.input_lanes)

    def run(self) -> int:
        prepare_multiprocess_dir(self._metrics_dir)
        # Children inherit the environment at spawn; the variable must be set before they
        # import prometheus_client.
        os.environ[MULTIPROC_DIR_ENV] = str(self._metrics_dir)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        server = start_http_server(
            self.settings.http_host,
            self.settings.http_port,
            health=self.health,
            metrics=lambda: render_multiprocess(self._metrics_dir, self._metrics),
        )
        log.info("supervisor started", processes=self.processes, port=server.port)
        try:
            for index in range(self.processes):
                self._start(index)
            while self._signals == 0:
                self._restart_dead()
                time.sleep(0.5)
            self._drain()
        finally:
            server.stop()
            self._redis.close()
        return 0

    def _start(self, index: int) -> None:
        self._beats[index] = time.time()
        child = self._mp.Process(
            target=_child_main,
            args=(self.settings, self.streams, self.consumers, index, self._beats),
            name=f"forge-worker-{index}",
        )
        child.start()
        self._children[index] = child
        log.info("worker process started", index=index, pid=child.pid)

    def _restart_dead(self) -> None:
        for index, child in enumerate(self._children):
            if child is None or child.is_alive():
                continue
            mark_worker_dead(self._metrics_dir, child.pid or 0)
            self._restarts[index] += 1
            delay_s = min(_RESTART_BACKOFF_MAX_S, 0.5 * 2 ** min(self._restarts[index], 6))
            log.warning(
                "worker process died, restarting",
                index=index,
                exitcode=child.exitcode,
                restart_in_s=delay_s,
            )
            self._children[index] = None
            time.sleep(delay_s)
            if self._signals == 0:
                self._start(index)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.settings.drain_timeout_s + 5
        for child in self._children:
            if child is not None and child.is_alive() and child.pid:
                os.kill(child.pid, signal.SIGTERM)
        for child in self._children:
            if child is not None:
                child.join(max(deadline - time.monotonic(), 0.1))
                if child.is_alive():
                    child.kill()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            for child in self._children:
                if child is not None and child.is_alive():
                    child.kill()
            os._exit(128 + signum)
        log.info("signal received, draining workers", signal=signal.Signals(signum).name)

    def health(self) -> HealthReport:
        checks: dict[str, str] = {}
        try:
            self._redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            return HealthReport(False, f"redis unreachable: {type(exc).__name__}", checks)
        max_age_s = max(60.0, 3 * self.settings.lease_renew_interval_s)
        now = time.time()
        for index, child in enumerate(self._children):
            if child is None or not child.is_alive():
                return HealthReport(False, f"worker process {index} is not running", checks)
            if now - self._beats[index] > max_age_s:
                return HealthReport(False, f"worker process {index} stalled", checks)
        checks["workers"] = f"{self.processes} alive"
        return HealthReport(True, "", checks)
