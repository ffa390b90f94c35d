"""``forge models`` (list, show, promote, upgrade): the MLflow model registry from the
command line (``forge predict`` is in ``cmd_predict``).

MLflow is reached at the worker's tracking URI (``MLFLOW_TRACKING_URI`` or the
embedded SQLite store under ``FORGE_HOME``), so these commands see what workers trained.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from forge.cli.output import print_json, print_table, shorten
from forge.errors import ForgeError
from forge.settings import Settings
from forge.training.versions import CANDIDATE, CHAMPION, ModelVersions, VersionInfo

# ---------------------------------------------------------------------- models


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    with _model_versions(settings) as versions:
        rows = [_summary(versions, name) for name in versions.models()]
    if args.json:
        print_json(rows)
        return 0
    headers = ["model", "latest", CHAMPION, CANDIDATE, "task", "metric", "value"]
    print_table(headers, [[row[h] for h in headers] for row in rows])
    return 0


def run_show(args: argparse.Namespace, settings: Settings) -> int:
    with _model_versions(settings) as versions:
        rows = [_version_row(v, versions.metrics(v)) for v in versions.all(args.model)]
    if args.json:
        print_json({"model": args.model, "versions": rows})
        return 0
    table = [
        [
            r["version"],
            ",".join(r["aliases"]),
            r["task"],
            _metric_text(r["primary_metric"], r["metrics"]),
            r["created_at"][:19],
            r["run_id"],
            shorten(r["request_id"], 40),
        ]
        for r in rows
    ]
    print_table(["version", "aliases", "task", "metric", "created", "run", "request"], table)
    return 0


def run_promote(args: argparse.Namespace, settings: Settings) -> int:
    from forge.training.promotion import promote

    with _model_versions(settings) as versions:
        version = promote(versions, args.model, args.version)
    print(f"{version.model} version {version.version} is now the {CHAMPION}")
    _tell_servers(settings)
    return 0


def run_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    """Make versions registered before Forge logged MLflow models loadable by MLflow."""
    from forge.training.upgrade import upgrade

    with _model_versions(settings) as versions:
        done = upgrade(versions, settings, args.model, dry_run=args.dry_run)
    rows = [
        {"model": u.model, "version": u.version, "action": u.action, "detail": u.detail}
        for u in done
    ]
    if args.json:
        print_json(rows)
        return 0
    headers = ["model", "version", "action", "detail"]
    print_table(headers, [[row[h] for h in headers] for row in rows])
    return 0


# ---------------------------------------------------------------------- helpers


def _tell_servers(settings: Settings) -> None:
    """Bump the route epoch, so servers and stream doors follow the new champion at
    their next poll. An embedded Redis nobody runs has no server reading it: nothing
    to tell, and no reason to start it. Redis out of reach does not undo the
    promotion: the command warns that servers were not told."""
    import redis

    from forge.cli.runtime import worker_may_be_running
    from forge.keys import Keys
    from forge.observability.logging import redact_text
    from forge.servers.endpoints import open_redis
    from forge.serving.routing import RouteStore

    if not worker_may_be_running(settings):
        return
    try:
        with open_redis(settings) as (client, used):
            RouteStore(client, Keys.from_settings(used)).bump()
    except redis.RedisError as exc:
        first = redact_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        sys.stderr.write(f"forge: warning: servers not told of the new champion: {first}\n")


@contextmanager
def mlflow_errors() -> Iterator[None]:
    """MLflow's own errors (server unreachable, bad URI) as one line, not a traceback."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise ForgeError(f"MLflow: {exc.message.splitlines()[0]}") from None


@contextmanager
def _model_versions(settings: Settings) -> Iterator[ModelVersions]:
    from forge.training.tracking import connect

    with mlflow_errors():
        yield ModelVersions(connect(settings))


def _summary(versions: ModelVersions, name: str) -> dict[str, Any]:
    aliases = versions.aliases(name)
    latest = versions.latest(name)
    shown = versions.get(name, aliases[CHAMPION]) if CHAMPION in aliases else latest
    metric = shown.primary_metric if shown else ""
    value = versions.metrics(shown).get(metric) if shown else None
    return {
        "model": name,
        "latest": latest.version if latest else None,
        CHAMPION: aliases.get(CHAMPION),
        CANDIDATE: aliases.get(CANDIDATE),
        "task": shown.task if shown else "",
        "metric": metric,
        "value": None if value is None else round(value, 4),
    }


def _version_row(version: VersionInfo, metrics: dict[str, float]) -> dict[str, Any]:
    created = datetime.fromtimestamp(version.created_at_ms / 1000, UTC)
    return {
        "version": version.version,
        "aliases": version.aliases,
        "task": version.task,
        "primary_metric": version.primary_metric,
        "metrics": metrics,
        "run_id": version.run_id,
        "request_id": version.request_id,
        "collection": version.collection,
        "created_at": created.isoformat(),
        "artifact_uri": version.source,
    }


def _metric_text(name: str, metrics: dict[str, float]) -> str:
    value = metrics.get(name)
    return f"{name}={value:.4f}" if value is not None else name
