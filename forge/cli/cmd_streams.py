"""Stream commands: publish, status and dlq."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from forge.cli.output import human_duration, print_json, print_table, shorten
from forge.cli.runtime import redis_location, worker_may_be_running
from forge.errors import ConfigError, ForgeError, InvalidEvent, UsageError
from forge.events import INPUT_STREAM_EVENTS, Completion, DeadLetter, Decoder, utcnow
from forge.keys import Keys
from forge.observability.status import snapshot
from forge.observability.training_queue import TrainingQueue, training_queue
from forge.runtime.broker import StreamBroker
from forge.runtime.completion_wait import completions_position, wait_for_completions
from forge.runtime.deadletter import DeadLetterEntry, DeadLetterQueue, parse_filters, parse_ref
from forge.runtime.entries import is_entry_id
from forge.servers.endpoints import open_redis
from forge.settings import Settings

# ---------------------------------------------------------------------- publish


def read_source(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    if source.startswith("@"):
        path = Path(source[1:])
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return source.encode()


def parse_events(data: bytes) -> list[dict[str, Any]]:
    """One JSON object, a JSON array of objects, or JSON lines."""
    text = data.strip()
    if not text:
        raise InvalidEvent("no event given")
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError:
        try:
            value = [msgspec.json.decode(line) for line in text.splitlines() if line.strip()]
        except msgspec.DecodeError as exc:
            raise InvalidEvent(f"malformed JSON: {exc}") from None
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, dict) for item in items):
        raise InvalidEvent("expected a JSON object, an array of objects, or JSON lines")
    return items


def validate_for_stream(keys: Keys, stream: str, items: list[dict[str, Any]]) -> list[bytes]:
    """Each item as a validated payload for ``stream`` (or a priority lane of it)."""
    event_types = INPUT_STREAM_EVENTS.get(keys.label(stream))
    if event_types is None:
        known = ", ".join(keys.resolve(s) for s in INPUT_STREAM_EVENTS)
        raise ConfigError(f"{stream!r} is not an input stream (known: {known})")
    decoder = Decoder(event_types[0], event_types[1:])
    payloads = []
    for index, item in enumerate(items):
        item.setdefault("created_at", utcnow().isoformat())
        payload = msgspec.json.encode(item)
        try:
            decoder.decode(payload)
        except InvalidEvent as exc:
            where = f"event {index}: " if len(items) > 1 else ""
            raise InvalidEvent(f"{where}{exc}") from None
        payloads.append(payload)
    return payloads


def run_publish(args: argparse.Namespace, settings: Settings) -> int:
    keys = Keys.from_settings(settings)
    stream = keys.resolve(args.stream)
    payloads = validate_for_stream(keys, stream, parse_events(read_source(args.source)))
    if args.wait and not worker_may_be_running(settings):
        raise ConfigError(
            "--wait needs a running 'forge worker': none serves the embedded Redis under "
            f"{settings.home_dir} (start one first, or publish without --wait)"
        )
    with open_redis(settings) as (client, _):
        broker = StreamBroker(client, keys, maxlen=settings.stream_maxlen)
        # Taken before publishing, so that no completion can come before it.
        since = completions_position(broker) if args.wait else None
        # Training requests go to their priority's lane.
        published = {broker.publish_input(stream, p): _event_id(p) for p in payloads}
        if since is None:
            sys.stdout.write("".join(f"{entry_id}\n" for _, entry_id in published))
            return 0
        outcomes = wait_for_completions(
            broker,
            published,
            since=since,
            timeout_s=args.timeout,
            on_completion=lambda c: print(_completion_line(c), flush=True),
        )
    unsuccessful = sum(c.status != "succeeded" for c in outcomes)
    if unsuccessful:
        raise PublishedEventsFailed(f"{unsuccessful} of {len(outcomes)} events did not succeed")
    return 0


def _event_id(payload: bytes) -> str:
    return str(msgspec.json.decode(payload)["id"])


class PublishedEventsFailed(ForgeError):
    """``publish --wait``: a completion said failed or dead-lettered."""


def _completion_line(completion: Completion) -> str:
    """Entry id, event id, status, seconds, then the result or the error."""
    if completion.error is not None:
        detail = shorten(f"{completion.error.type}: {completion.error.message}", 200)
    else:
        detail = msgspec.json.encode(completion.result).decode()
    took = f"{completion.timings.total_s:.2f}s"
    source_id = completion.source_id or "-"  # null when the event had no readable id
    fields = [completion.source_entry_id, source_id, completion.status, took, detail]
    return "  ".join(fields)


# ---------------------------------------------------------------------- status


def run_status(args: argparse.Namespace, settings: Settings) -> int:
    keys = Keys.from_settings(settings)
    where = _redis_origin(settings)
    with open_redis(settings) as (client, used):
        snap = snapshot(client, keys)
        queue = training_queue(client, keys)
    server = redis_location(used.redis_url or "")
    if args.json:
        print_json(
            {
                "redis": server,
                **msgspec.to_builtins(snap),
                "training_queue": msgspec.to_builtins(queue),
            }
        )
        return 0
    print(f"redis: {server} ({where})\n")
    rows, notes = [], []
    for s in snap.streams:
        group = s.group(keys.group)
        lag = "-" if group is None or group.lag is None else group.lag
        if group is not None and group.lag_unknown:
            notes.append(f"lag of {s.stream} unknown: {group.lag_unknown}")
        rows.append(
            [
                s.stream,
                s.length,
                lag,
                group.pending if group else "-",
                group.consumers if group else "-",
            ]
        )
    print_table(["stream", "length", "lag", "pending", "consumers"], rows)
    for note in notes:
        print(note)
    print(f"\ndead letters: {snap.dead_letter_depth}   replays: {snap.dead_letter_replays}")
    _print_training_queue(queue)
    return 0


def _print_training_queue(queue: TrainingQueue) -> None:
    counts = ", ".join(f"{n} {priority}" for priority, n in queue.queued.items())
    print(f"\ntraining queue: {counts or 'nothing'} queued")
    if not queue.trainings:
        return
    rows = [
        [
            t.priority,
            t.state,
            t.model,
            t.event_id,
            human_duration(t.waiting_s),
            t.worker or "-",
            t.deliveries or "-",
            t.detail,
        ]
        for t in queue.trainings
    ]
    headers = ["priority", "state", "model", "event id", "queued for", "worker", "deliveries"]
    print_table([*headers, "detail"], rows)


def _redis_origin(settings: Settings) -> str:
    if settings.redis_url:
        return "REDIS_URL"
    if worker_may_be_running(settings):
        return "embedded, served by a running worker"
    return "embedded, started for this command: no worker is running"


# ---------------------------------------------------------------------- dlq


def check_entry_ids(ids: list[str]) -> None:
    """Refuse a malformed id before Redis does, with what a valid one looks like."""
    for ref in ids:
        if not is_entry_id(parse_ref(ref)[1]):
            raise UsageError(
                f"{ref!r} is not a stream entry ID (expected MILLISECONDS-SEQUENCE, "
                "such as 1700000000000-0, or PARTITION/ID; see forge dlq list)"
            )


def _selected(dlq: DeadLetterQueue, args: argparse.Namespace) -> list[DeadLetterEntry]:
    chosen = sum(bool(x) for x in (args.ids, args.all, args.filter))
    if chosen != 1:
        raise ConfigError("give exactly one of: entry ids, --all, or --filter FIELD=GLOB")
    if args.ids:
        found = []
        for entry_id in args.ids:
            found.append(_show(dlq, entry_id))
        return found
    return dlq.select(parse_filters(args.filter) if args.filter else None)


def _show(dlq: DeadLetterQueue, ref: str) -> DeadLetterEntry:
    try:
        return dlq.show(ref)
    except KeyError:
        raise ConfigError(f"no dead-letter record {ref!r}") from None
    except LookupError as exc:
        raise ConfigError(str(exc)) from None


def _dlq(client: Any, settings: Settings) -> DeadLetterQueue:
    keys = Keys.from_settings(settings)
    return DeadLetterQueue(StreamBroker(client, keys, maxlen=settings.stream_maxlen))


def run_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    filters = parse_filters(args.filter)
    with open_redis(settings) as (client, _):
        items = _dlq(client, settings).select(filters, args.limit)
    if args.json:
        print_json([_json_record(i) for i in items])
        return 0
    rows = [
        [
            i.ref,
            i.record.source_stream,
            i.record.source_id or "-",
            i.record.deliveries,
            shorten(f"{i.record.error.type}: {i.record.error.message}"),
        ]
        for i in items
    ]
    print_table(["entry id", "source stream", "event id", "deliveries", "error"], rows)
    return 0


def run_dlq_show(args: argparse.Namespace, settings: Settings) -> int:
    check_entry_ids([args.id])
    with open_redis(settings) as (client, _):
        item = _show(_dlq(client, settings), args.id)
    if args.json:
        print_json(_json_record(item))
    else:
        sys.stdout.write(describe_record(item))
    return 0


def _json_record(item: DeadLetterEntry) -> dict[str, Any]:
    found: dict[str, Any] = {"entry_id": item.entry_id}
    if item.partition is not None:
        found |= {"partition": item.partition, "ref": item.ref}
    record: dict[str, Any] = msgspec.to_builtins(item.record)
    return found | record


def describe_record(item: DeadLetterEntry) -> str:
    """A record for people: ``field: value`` lines, then the payload and traceback as text."""
    record = item.record
    fields = [
        ("entry_id", item.ref),
        ("id", record.id),
        ("created_at", record.created_at.isoformat() if record.created_at else "-"),
        ("source_stream", record.source_stream),
        ("source_entry_id", record.source_entry_id),
        ("source_id", record.source_id or "-"),
        ("deliveries", record.deliveries),
        ("replays", record.replays),
        ("group", record.group or "-"),
        ("consumer", record.consumer or "-"),
        ("payload_encoding", record.payload_encoding),
    ]
    error = [("error_type", record.error.type), ("error_message", record.error.message)]
    lines = [*_field_lines(fields), "payload:", _printable(_pretty_payload(record) or "-")]
    lines += [*_field_lines(error), "traceback:"]
    lines.append(_printable(record.error.traceback.rstrip("\n") or "-"))
    return "\n".join(lines) + "\n"


def _field_lines(fields: Sequence[tuple[str, object]]) -> list[str]:
    # A value stays on its line (a newline in a message is escaped); blocks keep theirs.
    return [f"{name}: {_printable(str(value), keep='')}" for name, value in fields]


def _pretty_payload(record: DeadLetter) -> str:
    if record.payload_encoding != "utf-8":
        return record.payload
    try:
        return msgspec.json.format(record.payload, indent=2)
    # Not JSON, or nested too deeply: often why it was dead-lettered. Shown as it came.
    except (msgspec.DecodeError, RecursionError):
        return record.payload


# C0 and C1 controls and the invisible bidirectional overrides: payloads and messages
# come from producers, and must not drive (or hide lines from) the operator's terminal.
_UNPRINTABLE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str, keep: str = "\n\t") -> str:
    """``text`` with those characters escaped (``\\x1b``), except the ones in ``keep``."""
    return _UNPRINTABLE_RE.sub(lambda m: m[0] if m[0] in keep else ascii(m[0])[1:-1], text)


def run_dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    check_entry_ids(args.ids)
    with open_redis(settings) as (client, _):
        dlq = _dlq(client, settings)
        entries = _selected(dlq, args)
        new_ids: list[str] = dlq.replay(entries)
    for item, replayed_id in zip(entries, new_ids, strict=True):
        print(f"{item.ref} -> {item.record.source_stream} {replayed_id}")
    print(f"replayed {len(new_ids)}")
    return 0


def run_dlq_purge(args: argparse.Namespace, settings: Settings) -> int:
    check_entry_ids(args.ids)
    with open_redis(settings) as (client, _):
        dlq = _dlq(client, settings)
        if args.all and not args.ids and not args.filter:
            count = dlq.depth()
            dlq.purge(None)
        else:
            count = dlq.purge(_selected(dlq, args))
    print(f"purged {count}")
    return 0
