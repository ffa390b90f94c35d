"""``forge worker``: one worker in this process, or a supervisor of N worker processes."""

from __future__ import annotations

import argparse

from forge.runtime.serve import serve_worker
from forge.servers.endpoints import open_redis
from forge.settings import Settings


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
        from forge.runtime.supervisor import Supervisor

        with open_redis(settings, role="worker") as (_, resolved):
            return Supervisor(resolved, args.stream, args.consumers, args.processes).run()
    with open_redis(settings, role="worker") as (client, resolved):
        return serve_worker(resolved, client, args.stream, args.consumers)
