"""``forge worker``: one worker in this process, or a supervisor of N worker processes."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import redis
import structlog

from forge.cli.runtime import open_redis
from forge.context import Context, connect_redis_probe
from forge.http import HealthCheck, start_http_server
from forge.metrics import Metrics
from forge.registry import build_registry
from forge.settings import Settings
from forge.worker import Worker

log = structlog.get_logger(__name__)


def _apply_overrides(args: argparse.Namespace, settings: Settings) -> Settings:
    changes = {}
    if args.http_port is not None:
        changes["http_port"] = args.http_port
    if args.http_host is not None:
        changes["http_host"] = args.http_host
    return settings.replace(**changes) if changes else settings


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    settings = _apply_overrides(args, settings)
    if args.processes > 1:
        from forge.supervisor import Supervisor

        with open_redis(settings) as (_, resolved):
            return Supervisor(resolved, args.stream, args.consumers, args.processes).run()
    with open_redis(settings) as (client, resolved):
        return serve_worker(resolved, client, args.stream, args.consumers)


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
    probe = connect_redis_probe(settings.redis_url or "")
    ctx.on_close(probe.close)
    health = HealthCheck(redis_ping=probe.ping, loop_heartbeat_max_age_s=max_beat_age_s(settings))
    server = None
    try:
        registry = build_registry(ctx, consumers)
        worker = Worker(ctx, registry, streams or None, heartbeat=heartbeat or health.beat)
        metrics.init_streams(ctx.keys.short(s) for s in worker.streams)
        # Every input stream, not only this worker's: when an autoscaler takes one kind
        # of worker to zero, its backlog must still be visible.
        metrics.watch_streams(lambda: probe, ctx.keys, ctx.keys.input_streams)
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
