"""``forge completions``: the newest completions of every partition, merged by entry id
(``forge.observability.merged``), oldest of them first, for scripts and dashboards."""

from __future__ import annotations

import argparse

import msgspec

from forge.cli.output import print_json, print_table, shorten
from forge.errors import InvalidEvent
from forge.events import Completion, Decoder
from forge.keys import Keys
from forge.observability.merged import newest_completions
from forge.servers.endpoints import open_redis
from forge.settings import Settings


def run_completions(args: argparse.Namespace, settings: Settings) -> int:
    keys = Keys.from_settings(settings)
    with open_redis(settings) as (client, _):
        merged = newest_completions(client, keys, args.limit)
    decoder = Decoder(Completion)
    rows: list[tuple[str, str, Completion | None]] = []
    for entry_id, stream, payload in reversed(merged):
        try:
            rows.append((entry_id, stream, decoder.decode(payload)))
        except InvalidEvent:
            rows.append((entry_id, stream, None))  # another writer's entry: shown, not read
    if args.json:
        print_json([_json_row(keys, *row) for row in rows])
        return 0
    print_table(
        ["entry id", "stream", "source stream", "event id", "status", "detail"],
        [_table_row(keys, *row) for row in rows],
    )
    return 0


def _json_row(keys: Keys, entry_id: str, stream: str, done: Completion | None) -> object:
    event = None if done is None else msgspec.to_builtins(done)
    return {"entry_id": entry_id, "stream": keys.short(stream), "completion": event}


def _table_row(keys: Keys, entry_id: str, stream: str, done: Completion | None) -> list[str]:
    if done is None:
        return [entry_id, keys.short(stream), "?", "?", "unreadable", ""]
    detail = f"{done.error.type}: {done.error.message}" if done.error else ""
    return [
        entry_id,
        keys.short(stream),
        keys.short(done.source_stream),
        done.source_id or "-",
        done.status,
        shorten(detail),
    ]
