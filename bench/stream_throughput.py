"""Benchmark: Forge's consumer runtime against hand-written redis-py loops doing the same work.

    .venv/bin/python bench/stream_throughput.py [--events 20000] [--batch-sizes 32,100]
        [--redis-url redis://127.0.0.1:6379/0] [--repeat 3]

Every run pre-publishes ``--events`` new-data events (about 200 bytes of JSON each: one
record of 18 words and a small metadata map, unique event ids) to a fresh input stream
under a unique key prefix, then times consumption from the first read until the last
entry is settled.
The handler does nothing, so what is measured is the runtime's own per-message cost.
Variants, each on its own streams, same payloads, same batch size (XREADGROUP COUNT):

* ``forge``: a ``Worker`` with a no-op handler (returns None), driven by
  ``worker.run_once()`` until every entry is settled: XREADGROUP, msgspec decode into
  ``NewData``, MGET of the idempotency markers, handler, then one settle script call
  (EVALSHA, atomic) that runs an XADD of a ``Completion`` per event (MAXLEN ~), a SET
  EX of a done marker per event and the XACK of the batch. Metrics are updated as in
  production.
* ``raw-same``: the same Redis work written by hand with redis-py: XREADGROUP COUNT
  n, msgspec decode of each payload into ``forge.events.NewData``, MGET of one marker
  key per event, then one MULTI/EXEC pipeline with, per event, an XADD (MAXLEN ~) of
  a ``forge.events.Completion`` (same fields and size as Forge's, about 400 bytes,
  clock read once per batch) and a SET EX of the same marker value, and one XACK of
  the batch. Commands are queued with redis-py's methods (``pipe.xadd``, ``pipe.set``),
  as hand-written code usually does.
* ``raw-same-ec``: ``raw-same`` queuing XADD and SET with ``pipe.execute_command`` and
  ready-made arguments, as Forge's ``StreamBroker.settle`` does: the same commands on
  the wire without redis-py's per-call option checks. The tightest same-work loop.
* ``raw-minimal``: XREADGROUP COUNT n, msgspec decode into ``NewData``, then a plain
  pipeline (no MULTI) with one XADD (``pipe.xadd``) of a small completion (type, id,
  source id/stream/entry id, status, worker: about 200 bytes) per event and one XACK
  of the batch. No idempotency markers, no atomicity, no timings.

Each variant runs ``--repeat`` times (variants interleaved) and its best run counts.
The script checks every run: N completions on the output stream, nothing pending,
and N markers where the variant writes them. Only keys under its own ``bench:<uuid>:``
prefix are touched, and they are deleted at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from forge.events import EVENT_FIELD, Completion, NewData, Timings
from forge.observability.metrics import Metrics
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, HandlerSpec, Message
from forge.runtime.worker import Worker
from forge.servers.connect import connect_redis
from forge.settings import Settings
from tests.support.redis_helpers import delete_prefix

GROUP = "forge"
CONSUMER = "bench-consumer"
MAXLEN = 100_000
MARKER_TTL_S = 7 * 24 * 3600
TIMEOUT_S = 300.0  # per run: a runtime that stops settling fails the benchmark
TEXT = "the quick brown fox jumps over the lazy dog and then runs far away into the green hills"

_encoder = msgspec.json.Encoder()


class RawCompletion(msgspec.Struct, tag_field="type", tag="completion"):
    """What the raw variants publish per event: a small completion record."""

    id: str
    source_id: str
    source_stream: str
    source_entry_id: str
    status: str
    worker: str


def payloads(count: int) -> list[bytes]:
    return [
        _encoder.encode(
            {
                "type": "new-data",
                "id": f"e{i}",
                "collection": "bench",
                "records": [{"id": f"r{i}", "text": TEXT, "metadata": {"lang": "en"}}],
            }
        )
        for i in range(count)
    ]


def prepare(client: redis.Redis, stream: str, data: Sequence[bytes]) -> None:
    """Publish ``data`` to ``stream`` and create the consumer group from its start."""
    for start in range(0, len(data), 1000):
        pipe = client.pipeline(transaction=False)
        for payload in data[start : start + 1000]:
            pipe.xadd(stream, {EVENT_FIELD: payload})
        pipe.execute()
    client.xgroup_create(stream, GROUP, id="0")


def verify(client: redis.Redis, prefix: str, expected: int, markers: bool) -> None:
    """Every entry settled: acked, one completion each, and a marker each if ``markers``."""
    stream, completions = f"{prefix}new-data", f"{prefix}completions"
    published = client.xlen(completions)
    pending = int(client.xpending(stream, GROUP)["pending"])
    marked = sum(1 for _ in client.scan_iter(match=f"{prefix}done:*", count=1000))
    if published != expected or pending != 0 or marked != (expected if markers else 0):
        raise SystemExit(
            f"{stream}: {published} completions, {marked} markers (expected {expected}),"
            f" {pending} pending"
        )


def check_deadline(started: float, settled: int, expected: int) -> None:
    if time.perf_counter() - started > TIMEOUT_S:
        raise SystemExit(f"only {settled} of {expected} entries settled in {TIMEOUT_S:.0f} s")


# ---------------------------------------------------------------------------- variants


def run_forge(url: str, prefix: str, data: Sequence[bytes], batch: int) -> float:
    settings = Settings(
        redis_url=url,
        stream_prefix=prefix,
        group=GROUP,
        max_batch_size=batch,
        read_block_s=0.01,
        stream_maxlen=MAXLEN,
        idempotency_ttl_s=MARKER_TTL_S,
    )
    client = connect_redis(url)
    ctx = Context(settings=settings, redis=client, metrics=Metrics(gpu=False), consumer=CONSUMER)

    def handle(messages: Sequence[Message[NewData]]) -> None:
        return None

    registry = HandlerRegistry()
    registry.register(HandlerSpec("new-data", NewData, handle))
    worker = Worker(ctx, registry)
    prepare(client, ctx.keys.new_data, data)
    settled = 0
    started = time.perf_counter()
    while settled < len(data):
        settled += worker.run_once()
        check_deadline(started, settled, len(data))
    elapsed = time.perf_counter() - started
    verify(client, prefix, len(data), markers=True)
    client.close()
    return elapsed


def run_raw(
    url: str, prefix: str, data: Sequence[bytes], batch: int, same: bool, direct: bool
) -> float:
    """``same``: markers, MULTI and Forge's ``Completion``, else the minimal loop;
    ``direct``: queue XADD and SET with ``execute_command``."""
    client = connect_redis(url)
    stream, completions = f"{prefix}new-data", f"{prefix}completions"
    done_prefix = f"{prefix}done:{GROUP}:{stream}:"
    decoder = msgspec.json.Decoder(NewData)
    marker = _encoder.encode({"status": "succeeded", "result": {}, "error": None})
    trim = (b"MAXLEN", b"~", str(MAXLEN), "*", EVENT_FIELD)
    prepare(client, stream, data)
    settled = 0
    started = time.perf_counter()
    while settled < len(data):
        reply: Any = client.xreadgroup(GROUP, CONSUMER, {stream: ">"}, count=batch, block=10)
        if not reply:
            check_deadline(started, settled, len(data))
            continue
        items = reply[0][1]
        ids = [eid.decode() for eid, _ in items]
        events = [decoder.decode(fields[EVENT_FIELD]) for _, fields in items]
        seen = client.mget([done_prefix + e.id for e in events]) if same else [None] * len(ids)
        now, created_at = time.time(), datetime.now(UTC)
        pipe = client.pipeline(transaction=same)
        queue: Callable[..., Any] = pipe.execute_command
        for entry_id, event, stored in zip(ids, events, seen, strict=True):
            if stored is not None:
                continue
            completion: Completion | RawCompletion
            if same:
                queued_s = round(max(now - int(entry_id.split("-", 1)[0]) / 1000, 0.0), 6)
                completion = Completion(
                    id=uuid.uuid4().hex,
                    created_at=created_at,
                    source_id=event.id,
                    source_stream=stream,
                    source_entry_id=entry_id,
                    status="succeeded",
                    worker=CONSUMER,
                    timings=Timings(queue_s=queued_s, handler_s=0.0, total_s=queued_s),
                )
            else:
                completion = RawCompletion(
                    id=uuid.uuid4().hex,
                    source_id=event.id,
                    source_stream=stream,
                    source_entry_id=entry_id,
                    status="succeeded",
                    worker=CONSUMER,
                )
            payload = _encoder.encode(completion)
            if direct:
                queue("XADD", completions, *trim, payload)
            else:
                pipe.xadd(completions, {EVENT_FIELD: payload}, maxlen=MAXLEN, approximate=True)
            if same and direct:
                queue("SET", done_prefix + event.id, marker, "EX", MARKER_TTL_S)
            elif same:
                pipe.set(done_prefix + event.id, marker, ex=MARKER_TTL_S)
        pipe.xack(stream, GROUP, *ids)
        pipe.execute()
        settled += len(ids)
    elapsed = time.perf_counter() - started
    verify(client, prefix, len(data), markers=same)
    client.close()
    return elapsed


Runner = Callable[[str, str, Sequence[bytes], int], float]

VARIANTS: dict[str, Runner] = {
    "forge": run_forge,
    "raw-same": lambda url, prefix, data, batch: run_raw(url, prefix, data, batch, True, False),
    "raw-same-ec": lambda url, prefix, data, batch: run_raw(url, prefix, data, batch, True, True),
    "raw-minimal": lambda url, prefix, data, batch: run_raw(url, prefix, data, batch, False, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch-sizes", default="32,100")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]

    data = payloads(args.events)
    mean_bytes = sum(len(p) for p in data) / len(data)
    root = f"bench:{uuid.uuid4().hex[:12]}:"
    admin = redis.Redis.from_url(args.redis_url)
    server = admin.info("server")["redis_version"]
    print(
        f"{args.events} events of {mean_bytes:.0f} bytes, Redis {server} at {args.redis_url}, "
        f"best of {args.repeat}"
    )
    best: dict[tuple[str, int], float] = {}
    try:
        for batch in batch_sizes:
            for run in range(args.repeat):
                for name, runner in VARIANTS.items():
                    prefix = f"{root}{name}-{batch}-{run}:"
                    elapsed = runner(args.redis_url, prefix, data, batch)
                    delete_prefix(admin, prefix)
                    rate = args.events / elapsed
                    best[name, batch] = max(best.get((name, batch), 0.0), rate)
                    print(f"  batch {batch:>4}  {name:<12} run {run + 1}: {rate:>10,.0f} msgs/s")
    finally:
        delete_prefix(admin, root)
        admin.close()

    raws = [name for name in VARIANTS if name != "forge"]
    print("\nmsgs/s (best run), and forge / raw")
    print(f"{'batch':>5}" + "".join(f"  {name:>11}" for name in VARIANTS), end="")
    print("".join(f"  {'/' + name:>12}" for name in raws))
    for batch in batch_sizes:
        forge = best["forge", batch]
        rates = "".join(f"  {best[name, batch]:>11,.0f}" for name in VARIANTS)
        ratios = "".join(f"  {forge / best[name, batch]:>12.2f}" for name in raws)
        print(f"{batch:>5}{rates}{ratios}")


if __name__ == "__main__":
    main()
