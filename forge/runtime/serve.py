"""One worker in this process, with its health endpoint: what ``forge worker`` runs, and
what each child of the supervisor runs (beating to the parent instead)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import redis
import structlog

from forge.observability.http import HealthCheck, start_http_server
from forge.observability.metrics import Metrics
from forge.runtime.context import Context
from forge.runtime.handlers import build_handler_registry
from forge.runtime.worker import Worker
from forge.servers.connect import connect_redis_probe
from forge.settings import Settings

log = structlog.get_logger(__name__)


def serve_worker(
    settings: Settings,
    client: redis.Redis,
    streams: Sequence[str],
    consumers: Sequence[str],
    *,
    heartbeat: Callable[[], None] | None = None,
) -> int:
    """Run one worker until it is signalled to stop.

    Without a ``heartbeat`` (single-process mode) it also serves ``/health`` and
    ``/metrics``; under the supervisor the parent serves them and gets the beats.
    """
    metrics = Metrics()
    ctx = Context(settings=settings, redis=client, metrics=metrics)
    probe = connect_redis_probe(settings.redis_url or "", cluster=settings.redis_cluster)
    ctx.on_close(probe.close)
    health = HealthCheck(redis_ping=probe.ping, loop_heartbeat_max_age_s=max_beat_age_s(settings))
    server = None
    try:
        registry = build_handler_registry(ctx, consumers)
        worker = Worker(ctx, registry, streams or None, heartbeat=heartbeat or health.beat)
        # Partitions of a stream share its handler's labels.
        labels = dict.fromkeys(ctx.keys.short(ctx.keys.logical_name(s)) for s in worker.streams)
        metrics.init_streams(labels)
        # Every input stream, not only this worker's: when an autoscaler takes one kind
        # of worker to zero, its backlog must still be visible.
        metrics.watch_streams(lambda: probe, ctx.keys, ctx.keys.input_lanes)
        if heartbeat is None:
            server = start_http_server(
                settings.http_host, settings.http_port, health=health, metrics=metrics.render
            )
            log.info("http endpoint up", host=settings.http_host, port=server.port)
        worker.run()
    finally:
        if server is not None:
            server.stop()
        ctx.close()
    return 0


def max_beat_age_s(settings: Settings) -> float:
    """The loop beats every iteration, and the lease thread beats during long handlers."""
    return max(60.0, 3 * settings.lease_renew_interval_s, 5 * settings.read_block_s)
