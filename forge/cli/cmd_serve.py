"""``forge serve``: the HTTP API (predictions, models, collection search) until
SIGTERM or SIGINT."""

from __future__ import annotations

import argparse

from forge.servers.endpoints import open_redis
from forge.serving.auth import check_exposure
from forge.settings import Settings


def _apply_overrides(args: argparse.Namespace, settings: Settings) -> Settings:
    changes = {
        name: value
        for name, value in (
            ("serve_host", args.host),
            ("serve_port", args.port),
            ("serve_workers", args.workers),
        )
        if value is not None
    }
    return settings.replace(**changes) if changes else settings


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    settings = _apply_overrides(args, settings)
    # Before anything starts: an open API must not come up even for a moment.
    check_exposure(settings)
    from forge.serving import server

    server.quiet_torch_threads()  # before anything imports torch
    # A server runs until stopped: it must not join a one-shot command's Redis.
    with open_redis(settings, role="worker") as (client, resolved):
        if resolved.serve_workers > 1:
            return server.serve(resolved)
        from forge.serving.app import create_app, services

        return server.serve(resolved, create_app(services(resolved, client)))
