"""The ``forge`` command line: every command's arguments, and which function runs it.

Commands are named, not imported (``Lazy``): the parser is built whole for every
command line, and what one command needs must not slow down the others. Importing every
command module would make ``forge models list`` import redis, psycopg and the vector
store, and ``forge --help`` numpy ("Cold commands" in docs/benchmarks.md). Keep this
module's imports to argparse, the argument types and the settings.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from forge import __version__
from forge.cli.argtypes import port, positive_int, positive_seconds, vector, version_number
from forge.settings import STORAGE_TYPES, Settings

EXIT_USAGE = 2
# The stores ``forge backup`` covers (``forge.backup.manifest.PART_NAMES``, not imported:
# see the module notes).
BACKUP_PARTS = ("redis", "postgres", "mlflow")

Command = Callable[[argparse.Namespace, Settings], int]


@dataclass(frozen=True, slots=True)
class Lazy:
    """``forge.cli.<module>.<function>``, imported when the command runs."""

    module: str
    function: str

    def resolve(self) -> Command:
        found: Command = getattr(importlib.import_module(f"forge.cli.{self.module}"), self.function)
        return found

    def __call__(self, args: argparse.Namespace, settings: Settings) -> int:
        return self.resolve()(args, settings)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="forge", description="Redis Streams ML training and embedding engine.")
    parser.add_argument("--version", action="version", version=f"forge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (
        _worker,
        _publish,
        _status,
        _dlq,
        _search,
        _collections,
        _models,
        _tune,
        _predict,
        _serve,
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


def _search(sub: Any) -> None:
    search = sub.add_parser("search", help="find the records nearest to a text")
    search.add_argument("collection")
    search.add_argument("text")
    search.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    search.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE")
    search.add_argument("--json", action="store_true")
    search.set_defaults(run=Lazy("cmd_search", "run_search"))


def _collections(sub: Any) -> None:
    collections = sub.add_parser("collections", help="vector store collections and versions")
    commands = collections.add_subparsers(dest="collections_command", required=True)
    listing = commands.add_parser("list", help="each collection: versions, rows, model, size")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=Lazy("cmd_collections", "run_list"))
    show = commands.add_parser("show", help="a collection's versions in full")
    show.add_argument("collection")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=Lazy("cmd_collections", "run_show"))
    reembed = commands.add_parser("reembed", help="re-embed into a new version, switch when done")
    reembed.add_argument("collection")
    reembed.add_argument("--model", help="embedding model (default: the collection's)")
    reembed.add_argument(
        "--batch-records", type=positive_int, metavar="N", help="records per backfill batch"
    )
    reembed.add_argument("--storage", choices=STORAGE_TYPES, help="the new version's column type")
    reembed.add_argument("--wait", action="store_true", help="wait until the backfill is planned")
    reembed.add_argument("--timeout", type=positive_seconds, default=120.0, metavar="S")
    reembed.set_defaults(run=Lazy("cmd_collections", "run_reembed"))
    load = commands.add_parser("load", help="a new collection's first load, index built once")
    load.add_argument("collection")
    load.add_argument("file", help="JSON lines: {id, text|vector, metadata} per line")
    load.add_argument("--model", help="embedding model for texts (default FORGE_EMBEDDING_MODEL)")
    _index_build(load)
    load.add_argument(
        "--storage", choices=STORAGE_TYPES, help="column type (default FORGE_VECTOR_STORAGE)"
    )
    load.set_defaults(run=Lazy("cmd_collections", "run_load"))
    build = commands.add_parser("build-index", help="build a deferred HNSW index now")
    build.add_argument("collection")
    _index_build(build)
    build.set_defaults(run=Lazy("cmd_collections", "run_build_index"))
    rollback = commands.add_parser("rollback", help="switch back to the previous version")
    rollback.add_argument("collection")
    rollback.set_defaults(run=Lazy("cmd_collections", "run_rollback"))
    drop = commands.add_parser("drop-version", help="delete a version that is not active")
    drop.add_argument("collection")
    drop.add_argument("version", type=positive_int)
    drop.set_defaults(run=Lazy("cmd_collections", "run_drop_version"))


def _index_build(parser: Any) -> None:
    """How an HNSW index is built once: graph memory and parallel workers."""
    parser.add_argument("--index-memory", type=positive_int, metavar="MB", help="graph memory")
    parser.add_argument("--index-workers", type=positive_int, default=2, metavar="N")


def _models(sub: Any) -> None:
    models = sub.add_parser("models", help="trained models in the MLflow model registry")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", help="models with their latest version and champion")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=Lazy("cmd_models", "run_list"))
    show = models_sub.add_parser("show", help="a model's versions, aliases and metrics")
    show.add_argument("model")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=Lazy("cmd_models", "run_show"))
    promote = models_sub.add_parser("promote", help="make a version the champion")
    promote.add_argument("model")
    promote.add_argument("version", type=version_number)
    promote.set_defaults(run=Lazy("cmd_models", "run_promote"))
    upgrade = models_sub.add_parser(
        "upgrade", help="make versions registered before MLflow models loadable by MLflow"
    )
    upgrade.add_argument("model", nargs="?", help="one model (default: every Forge model)")
    upgrade.add_argument("--dry-run", action="store_true", help="say what would change")
    upgrade.add_argument("--json", action="store_true")
    upgrade.set_defaults(run=Lazy("cmd_models", "run_upgrade"))
    _experiments(models_sub)


def _tune(sub: Any) -> None:
    tune = sub.add_parser("tune", help="hyperparameter searches (training requests with `tune`)")
    tune_sub = tune.add_subparsers(dest="tune_command", required=True)
    show = tune_sub.add_parser(
        "show", help="a model's latest study: trials, best value, parameter importances"
    )
    show.add_argument("model")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=Lazy("cmd_tune", "run_show"))
    stop = tune_sub.add_parser(
        "stop",
        help="stop a running study: no new trial starts, the request completes with the"
        " best trial so far",
    )
    stop.add_argument("model")
    stop.add_argument("request_id", metavar="REQUEST_ID", help="the training request's id")
    stop.set_defaults(run=Lazy("cmd_tune", "run_stop"))


def _experiments(models_sub: Any) -> None:
    split = models_sub.add_parser(
        "split", help="split a model's traffic between versions, e.g. champion=90 candidate=10"
    )
    split.add_argument("model")
    split.add_argument(
        "variants",
        nargs="*",
        metavar="REF=WEIGHT",
        help="an alias or version number and its weight",
    )
    split.add_argument("--clear", action="store_true", help="remove the split: all to the champion")
    split.set_defaults(run=Lazy("cmd_serving", "run_split"))
    shadow = models_sub.add_parser(
        "shadow", help="let a version answer every request beside the champion, unseen"
    )
    shadow.add_argument("model")
    shadow.add_argument("ref", nargs="?", help="an alias or version number, e.g. candidate")
    shadow.add_argument("--off", action="store_true", help="stop shadowing")
    shadow.set_defaults(run=Lazy("cmd_serving", "run_shadow"))
    compare = models_sub.add_parser(
        "compare", help="online accuracy, latency and a verdict per variant, on live feedback"
    )
    compare.add_argument("model")
    compare.add_argument("--json", action="store_true")
    compare.set_defaults(run=Lazy("cmd_serving", "run_compare"))


def _predict(sub: Any) -> None:
    predict = sub.add_parser("predict", help="label texts or vectors with a trained model")
    predict.add_argument("model", help="MODEL, MODEL@ALIAS or MODEL@VERSION (default champion)")
    given = predict.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", action="append", help="a text to embed and label (repeat)")
    given.add_argument(
        "--vector", action="append", type=vector, help="a vector: 0.1,0.2,... or [...] (repeat)"
    )
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(run=Lazy("cmd_predict", "run_predict"))


def _serve(sub: Any) -> None:
    serve = sub.add_parser("serve", help="the HTTP API: predictions, models and collection search")
    serve.add_argument(
        "--host",
        default=None,
        help="interface to listen on (default: $FORGE_SERVE_HOST, else"
        " 127.0.0.1; beyond loopback FORGE_API_TOKEN is required)",
    )
    serve.add_argument(
        "--port",
        type=port,
        default=None,
        help="port, 0 for any free one (default: $FORGE_SERVE_PORT, else 8000)",
    )
    serve.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="server processes sharing the port (default: $FORGE_SERVE_WORKERS, else 1)",
    )
    serve.set_defaults(run=Lazy("cmd_serve", "run_serve"))


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
