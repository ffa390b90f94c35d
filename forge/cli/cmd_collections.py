"""``forge collections``: the vector store's collections and their versions."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

from forge.cli.output import print_json, print_table
from forge.errors import PermanentError
from forge.servers.embedded_postgres import resolve_postgres_url
from forge.settings import Settings
from forge.vectorstore import CollectionNotFound, VectorStore
from forge.vectorstore.inventory import CollectionInfo, VersionInfo
from forge.vectorstore.naming import validate_name


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    with _store(settings) as store:
        found = store.describe_all()
    if args.json:
        print_json(found)
        return 0
    headers = ["collection", "active", "versions", "rows", "model", "dim", "index", "size"]
    print_table(headers, [_summary(c) for c in found])
    return 0


def run_show(args: argparse.Namespace, settings: Settings) -> int:
    validate_name(args.collection)  # before a server starts or a database migrates
    with _store(settings) as store:
        info = store.describe(args.collection)
    if args.json:
        print_json(info)
        return 0
    print(f"collection {info.name}: active version {info.active_version}, {info.rows} rows")
    headers = ["version", "state", "rows", "model", "dim", "index", "size", "created"]
    print_table(headers, [_version_row(v) for v in info.versions])
    return 0


def run_reembed(args: argparse.Namespace, settings: Settings) -> int:
    """Publish a ``reembed`` event on new-data: workers build the new version."""
    from forge.cli.cmd_streams import run_publish  # Redis only for this command
    from forge.events import new_id

    validate_name(args.collection)
    event = {
        "type": "reembed",
        "id": f"reembed-{args.collection}-{new_id()[:12]}",
        "collection": args.collection,
        "model": args.model,
        "batch_records": args.batch_records,
        "storage": args.storage,
    }
    source = json.dumps({k: v for k, v in event.items() if v is not None})
    forward = argparse.Namespace(
        stream="new-data", source=source, wait=args.wait, timeout=args.timeout
    )
    return run_publish(forward, settings)


def run_rollback(args: argparse.Namespace, settings: Settings) -> int:
    validate_name(args.collection)
    with _store(settings) as store:
        version = store.versions.rollback(args.collection)
    print(f"collection {args.collection}: version {version.version} active (model {version.model})")
    return 0


def run_drop_version(args: argparse.Namespace, settings: Settings) -> int:
    validate_name(args.collection)
    with _store(settings) as store:
        version = store.versions.drop(args.collection, args.version)
    print(f"collection {args.collection}: version {version.version} ({version.state}) dropped")
    return 0


def run_load(args: argparse.Namespace, settings: Settings) -> int:
    """Embed a JSON-lines file of records into a new collection, index built once."""
    from forge.cli.bulk_load import load_file

    validate_name(args.collection)
    with _store(settings) as store:
        result = load_file(store, settings, args)
    print(
        f"collection {args.collection}: {result.rows} rows loaded in {result.load_s:.1f} s,"
        f" index built in {result.index_s:.1f} s"
    )
    return 0


def run_build_index(args: argparse.Namespace, settings: Settings) -> int:
    """Build a collection's deferred HNSW index now, not when its first load is over."""
    from forge.vectorstore.bulk import IndexBuild

    validate_name(args.collection)
    started = time.perf_counter()
    with _store(settings) as store:
        result = store.indexes.build(
            args.collection, IndexBuild(args.index_memory, args.index_workers)
        )
    name = args.collection
    if result == "gone":
        raise CollectionNotFound(f"collection {name!r} does not exist")
    if result == "busy":
        raise PermanentError(f"collection {name!r} is being loaded or indexed by another process")
    if result == "indexed":
        print(f"collection {name}: its index is built already")
    else:
        print(f"collection {name}: index built in {time.perf_counter() - started:.1f} s")
    return 0


@contextmanager
def _store(settings: Settings) -> Iterator[VectorStore]:
    url, embedded = resolve_postgres_url(settings)
    try:
        with VectorStore.from_settings(url, settings, max_connections=1) as store:
            yield store
    finally:
        if embedded is not None:
            embedded.stop()


def _summary(info: CollectionInfo) -> list[object]:
    active = next((v for v in info.versions if v.version == info.active_version), None)
    index = _index_text(active) if active else ""
    versions = ",".join(f"{v.version}:{v.state}" for v in info.versions)
    return [
        info.name,
        info.active_version,
        versions,
        info.rows,
        info.model,
        info.dimension,
        index,
        human_bytes(info.size_bytes),
    ]


def _version_row(version: VersionInfo) -> list[object]:
    return [
        version.version,
        version.state,
        version.rows,
        version.model,
        version.dimension,
        _index_text(version),
        human_bytes(version.size_bytes),
        version.created_at.isoformat(timespec="seconds"),
    ]


def _index_text(version: VersionInfo) -> str:
    index = version.index
    text = f"{index.type} m={index.m} ef_construction={index.ef_construction} ({version.storage})"
    return text if index.built else f"{text}, not built yet"


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
