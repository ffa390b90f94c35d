"""The arguments of the commands on collections, models, searches, predictions and
serving (``forge.cli.parsers`` builds the whole command line from them). Imports stay
as light as ``parsers``'s: argparse, the argument types and the settings."""

from __future__ import annotations

from typing import Any

from forge.cli.argtypes import port, positive_int, positive_seconds, vector, version_number
from forge.cli.command import Lazy
from forge.settings import STORAGE_TYPES


def add_search(sub: Any) -> None:
    search = sub.add_parser("search", help="find the records nearest to a text")
    search.add_argument("collection")
    search.add_argument("text")
    search.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    search.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE")
    search.add_argument("--json", action="store_true")
    search.set_defaults(run=Lazy("cmd_search", "run_search"))


def add_collections(sub: Any) -> None:
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


def add_models(sub: Any) -> None:
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


def add_tune(sub: Any) -> None:
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


def add_predict(sub: Any) -> None:
    predict = sub.add_parser("predict", help="label texts or vectors with a trained model")
    predict.add_argument("model", help="MODEL, MODEL@ALIAS or MODEL@VERSION (default champion)")
    given = predict.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", action="append", help="a text to embed and label (repeat)")
    given.add_argument(
        "--vector", action="append", type=vector, help="a vector: 0.1,0.2,... or [...] (repeat)"
    )
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(run=Lazy("cmd_predict", "run_predict"))


def add_serve(sub: Any) -> None:
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
