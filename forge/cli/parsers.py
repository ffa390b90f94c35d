"""The ``forge`` command line: every command's arguments, and which function runs it.

Commands are named, not imported (``Lazy``): the parser is built whole for every
command line, and what one command needs must not slow down the others. Importing every
command module would make ``forge models list`` import redis, psycopg and the vector
store, and ``forge --help`` numpy ("Cold commands" in docs/benchmarks.md). Keep this
module's imports to argparse, the argument types and the settings.
"""

from __future__ import annotations

import argparse
from typing import Any

from forge import __version__
from forge.cli.argtypes import port, positive_int, positive_seconds
from forge.cli.command import Lazy, UsageParser
from forge.cli.parsers_models import (
    add_collections,
    add_models,
    add_predict,
    add_search,
    add_serve,
    add_tune,
)

# The stores ``forge backup`` covers (``forge.backup.manifest.PART_NAMES``, not imported:
# see the module notes).
BACKUP_PARTS = ("redis", "postgres", "mlflow")


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="forge", description="Redis Streams ML training and embedding engine."
    )
    parser.add_argument("--version", action="version", version=f"forge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=UsageParser)
    for add in (
        _worker,
        _publish,
        _status,
        _dlq,
        add_search,
        add_collections,
        add_models,
        add_tune,
        add_predict,
        add_serve,
        _watch,
        _completions,
        _docs,
        _env,
        _backup,
        _schemas,
    ):
        add(sub)
    return parser


def _worker(sub: Any) -> None:
    worker = sub.add_parser("worker", help="run consumer-group workers")
    worker.add_argument("--stream", action="append", default=[], help="input stream (repeat)")
    worker.add_argument(
        "--processes",
        type=positive_int,
        default=1,
        help="worker processes under one supervisor that serves /health and /metrics"
        " for all of them (default 1: the worker runs in this process)",
    )
    worker.add_argument(
        "--http-port",
        type=port,
        default=None,
        help="port of /health and /metrics, 0 for any free one"
        " (default: $FORGE_HTTP_PORT, else 8080)",
    )
    worker.add_argument(
        "--http-host",
        default=None,
        help="address /health and /metrics listen on (default: $FORGE_HTTP_HOST, else 127.0.0.1)",
    )
    worker.add_argument(
        "--consumers", action="append", default=[], help="module:function registering handlers"
    )
    worker.set_defaults(run=Lazy("cmd_worker", "run_worker"))


def _publish(sub: Any) -> None:
    publish = sub.add_parser("publish", help="validate and publish events to a stream")
    publish.add_argument("stream", help="stream name, e.g. forge:new-data or new-data")
    publish.add_argument("source", help="JSON text, @file (object, array or JSON lines) or -")
    publish.add_argument(
        "--wait",
        action="store_true",
        help="wait for each event's completion and print it; exit 1 unless all succeeded",
    )
    publish.add_argument(
        "--timeout",
        type=positive_seconds,
        default=120.0,
        metavar="S",
        help="with --wait: give up after S seconds (default 120)",
    )
    publish.set_defaults(run=Lazy("cmd_streams", "run_publish"))


def _status(sub: Any) -> None:
    status = sub.add_parser(
        "status", help="the Redis in use; length, lag, pending and consumers per stream"
    )
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=Lazy("cmd_streams", "run_status"))


def _dlq(sub: Any) -> None:
    dlq = sub.add_parser("dlq", help="inspect, replay and purge dead-lettered events")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)

    listing = dlq_sub.add_parser("list", help="list dead-letter records")
    listing.add_argument("--filter", action="append", default=[], metavar="FIELD=GLOB")
    listing.add_argument("--limit", type=int, default=None)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=Lazy("cmd_streams", "run_dlq_list"))

    show = dlq_sub.add_parser("show", help="show one record in full")
    show.add_argument("id", help="dead-letter entry id, as listed by 'forge dlq list'")
    show.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    show.set_defaults(run=Lazy("cmd_streams", "run_dlq_show"))

    for name, run, verb in (
        ("replay", "run_dlq_replay", "replay"),
        ("purge", "run_dlq_purge", "delete"),
    ):
        cmd = dlq_sub.add_parser(name, help=f"{verb} records")
        cmd.add_argument("ids", nargs="*", help="dead-letter entry ids")
        cmd.add_argument("--all", action="store_true", help=f"{verb} every record")
        cmd.add_argument("--filter", action="append", default=[], metavar="FIELD=GLOB")
        cmd.set_defaults(run=Lazy("cmd_streams", run))


def _completions(sub: Any) -> None:
    done = sub.add_parser(
        "completions", help="the newest completions of every partition, merged by time"
    )
    done.add_argument("--limit", type=positive_int, default=20, help="completions to print")
    done.add_argument("--json", action="store_true", help="print JSON")
    done.set_defaults(run=Lazy("cmd_completions", "run_completions"))


def _watch(sub: Any) -> None:
    watch = sub.add_parser(
        "watch", help="live view of completions, throughput, lag, dead letters and trainings"
    )
    watch.add_argument("--once", action="store_true", help="print one snapshot and exit")
    watch.add_argument("--interval-s", type=positive_seconds, default=2.0, help="refresh period")
    watch.add_argument("--rows", type=positive_int, default=15, help="completions to show")
    watch.add_argument(
        "--window-s", type=positive_seconds, default=60.0, help="throughput averaging window"
    )
    watch.add_argument(
        "--stale-s",
        type=positive_seconds,
        default=300.0,
        help="hide trainings without progress for this long",
    )
    watch.set_defaults(run=Lazy("cmd_watch", "run_watch"))


def _env(sub: Any) -> None:
    env = sub.add_parser(
        "env",
        help="print REDIS_URL=... and POSTGRES_URL=... of the servers in use, for eval",
        description="Print shell assignments (REDIS_URL, REDIS_SOCKET, POSTGRES_URL) for "
        "the configured servers, or for the embedded ones a running 'forge worker' "
        "serves; or print one value alone.",
    )
    only = env.add_mutually_exclusive_group()
    only.add_argument("--redis-url", action="store_true", help="print the Redis URL alone")
    only.add_argument(
        "--redis-socket",
        action="store_true",
        help="print the Redis unix socket path alone (for redis-cli -s)",
    )
    only.add_argument("--postgres-url", action="store_true", help="print the PostgreSQL URL alone")
    env.set_defaults(run=Lazy("cmd_env", "run_env"))


def _backup(sub: Any) -> None:
    backup = sub.add_parser(
        "backup", help="back up, verify and restore Redis, PostgreSQL and MLflow state"
    )
    commands = backup.add_subparsers(dest="backup_command", required=True)
    create = commands.add_parser("create", help="write a backup into a new or empty folder")
    create.add_argument("dir", help="the backup folder")
    create.add_argument(
        "--exclude",
        action="append",
        default=[],
        choices=BACKUP_PARTS,
        help="leave a store out (repeat); e.g. an MLflow tracking server backed up apart",
    )
    create.add_argument("--json", action="store_true", help="print the manifest as JSON")
    create.set_defaults(run=Lazy("cmd_backup", "run_create"))
    verify = commands.add_parser("verify", help="check every file of a backup against its manifest")
    verify.add_argument("dir", help="the backup folder")
    verify.add_argument("--json", action="store_true", help="print the manifest as JSON")
    verify.set_defaults(run=Lazy("cmd_backup", "run_verify"))
    restore = commands.add_parser(
        "restore", help="restore a backup into servers that hold no data (stop workers first)"
    )
    restore.add_argument("dir", help="the backup folder")
    restore.add_argument(
        "--force", action="store_true", help="replace what the servers hold instead of refusing"
    )
    restore.set_defaults(run=Lazy("cmd_backup", "run_restore"))


def _docs(sub: Any) -> None:
    help_ = "write docs/asyncapi.yaml, configuration.md"
    _export(sub, "docs", "generated documentation", help_, "run_docs_export")


def _schemas(sub: Any) -> None:
    _export(
        sub, "schemas", "event JSON Schemas", "write schemas/*.schema.json", "run_schemas_export"
    )


def _export(sub: Any, command: str, help_: str, export_help: str, run: str) -> None:
    parser = sub.add_parser(command, help=help_)
    commands = parser.add_subparsers(dest=f"{command}_command", required=True)
    export = commands.add_parser("export", help=export_help)
    export.add_argument("--dir", default=command)  # each writes the folder it is named after
    export.add_argument("--check", action="store_true", help="fail if files differ from code")
    export.set_defaults(run=Lazy("cmd_docs", run))
