"""Benchmark: stream throughput on one Redis node against three, with partitions (issue 15).

    .venv/bin/python bench/cluster_throughput.py [--events 20000] [--workers 2]
        [--batch 100] [--repeat 2]

Every run pre-publishes ``--events`` new-data events (about 200 bytes each, over 1,000
collections, so the partitioning rule spreads them evenly) and then times ``--workers``
worker processes, each a Forge ``Worker`` with a no-op handler (the runtime's own cost:
read, decode, markers, one settle script per batch), from a common start until every
event has its completion. Variants, each on servers of its own with no persistence (as
the machine's Redis, which keeps nothing on disk):

* ``plain``: one ``redis-server``, ``FORGE_STREAM_PARTITIONS=1``: today's layout.
* ``cluster-1``: a Redis Cluster of one master, three partitions.
* ``cluster-3``: a Redis Cluster of three masters, three partitions (one a master).
* ``raw``: the baseline, on the plain server: hand-written redis-py loops in as many
  processes (XREADGROUP, then one pipeline of an XADD of a small completion per event
  and an XACK), no markers, no atomicity.

What it shows: what partitioning over several masters buys once one Redis is the
bottleneck. On 2 shared cores the servers and the workers compete for the same CPUs, so
expect little: the figure that matters comes from a machine with a core per master and
per worker. Each variant runs ``--repeat`` times (interleaved) and its best run counts.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import msgspec
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from forge.events import EVENT_FIELD, NewData
from forge.keys import Keys
from forge.observability.metrics import Metrics
from forge.runtime.broker import StreamBroker
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, HandlerSpec, Message
from forge.runtime.worker import Worker
from forge.servers.connect import connect_redis
from forge.servers.redis_binary import find_redis_server
from forge.settings import Settings
from tests.support.redis_cluster import LocalCluster
from tests.support.redis_cluster_node import free_port, wait_until

PARTITIONS = 3
TEXT = "the quick brown fox jumps over the lazy dog and then runs far away into the green hills"
TIMEOUT_S = 600.0


def payloads(count: int) -> list[bytes]:
    encoder = msgspec.json.Encoder()
    return [
        encoder.encode(
            {
                "type": "new-data",
                "id": f"e{i}",
                "collection": f"c{i % 1000}",
                "records": [{"id": f"r{i}", "text": TEXT, "metadata": {"lang": "en"}}],
            }
        )
        for i in range(count)
    ]


def settings_for(url: str, cluster: bool, partitions: int, prefix: str, batch: int) -> Settings:
    return Settings(
        redis_url=url,
        redis_cluster=cluster,
        stream_partitions=partitions,
        stream_prefix=prefix,
        max_batch_size=batch,
        read_block_s=0.01,
    )


def publish(settings: Settings, data: Sequence[bytes]) -> None:
    """Every event to its partition by the rule, pipelined; groups created first."""
    client = connect_redis(settings.redis_url or "", cluster=settings.redis_cluster)
    keys = Keys.from_settings(settings)
    broker = StreamBroker(client, keys, maxlen=settings.stream_maxlen)
    broker.ensure_groups(keys.physical(keys.new_data))
    for start in range(0, len(data), 1000):
        pipe = client.pipeline(transaction=False)
        for payload in data[start : start + 1000]:
            pipe.xadd(broker.route(keys.new_data, payload), {EVENT_FIELD: payload})
        pipe.execute()
    client.close()


def settled(client: redis.Redis, keys: Keys) -> int:
    return sum(int(client.xlen(s)) for s in keys.physical(keys.completions))


# ---------------------------------------------------------------------------- consumers


def consume_forge(settings: Settings, start: Barrier, stop: Event) -> None:
    client = connect_redis(settings.redis_url or "", cluster=settings.redis_cluster)
    ctx = Context(settings=settings, redis=client, metrics=Metrics(gpu=False))

    def handle(messages: Sequence[Message[NewData]]) -> None:
        return None

    registry = HandlerRegistry()
    registry.register(HandlerSpec("new-data", NewData, handle))
    worker = Worker(ctx, registry)
    ctx.broker.join_groups(worker.streams, ctx.consumer)
    start.wait()
    while not stop.is_set():
        worker.run_once()
    client.close()


def consume_raw(settings: Settings, start: Barrier, stop: Event) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    keys = Keys.from_settings(settings)
    stream, completions, group = keys.new_data, keys.completions, keys.group
    consumer = uuid.uuid4().hex
    decoder = msgspec.json.Decoder(NewData)
    encoder = msgspec.json.Encoder()
    start.wait()
    while not stop.is_set():
        reply: Any = client.xreadgroup(
            group, consumer, {stream: ">"}, count=settings.max_batch_size, block=10
        )
        if not reply:
            continue
        items = reply[0][1]
        pipe = client.pipeline(transaction=False)
        for entry_id, fields in items:
            event = decoder.decode(fields[EVENT_FIELD])
            done = {
                "type": "completion",
                "source_id": event.id,
                "source_entry_id": entry_id.decode(),
                "status": "succeeded",
            }
            pipe.xadd(
                completions, {EVENT_FIELD: encoder.encode(done)}, maxlen=100_000, approximate=True
            )
        pipe.xack(stream, group, *[eid for eid, _ in items])
        pipe.execute()
    client.close()


# ---------------------------------------------------------------------------- runs


Consumer = Callable[[Settings, Barrier, Event], None]


def timed(settings: Settings, data: Sequence[bytes], workers: int, consume: Consumer) -> float:
    """Seconds from the workers' common start until every event has its completion."""
    publish(settings, data)
    spawn = mp.get_context("spawn")
    # The clock starts once every worker has imported and joined its groups.
    start, stop = spawn.Barrier(workers + 1), spawn.Event()
    procs = [spawn.Process(target=consume, args=(settings, start, stop)) for _ in range(workers)]
    for proc in procs:
        proc.start()
    client = connect_redis(settings.redis_url or "", cluster=settings.redis_cluster)
    keys = Keys.from_settings(settings)
    start.wait()
    started = time.perf_counter()
    while settled(client, keys) < len(data):
        if time.perf_counter() - started > TIMEOUT_S:
            raise SystemExit(f"not settled within {TIMEOUT_S:.0f} s")
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    stop.set()
    for proc in procs:
        proc.join(30)
    client.close()
    return elapsed


class PlainServer:
    """A throwaway ``redis-server`` that keeps nothing on disk."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="forge-bench-redis-")
        argv = [str(find_redis_server()), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", self.dir]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until("redis-server answering", self._not_answering, 30)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _not_answering(self) -> str | None:
        try:
            redis.Redis(port=self.port).ping()
        except redis.ConnectionError as exc:
            return str(exc)
        return None

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run_variant(name: str, data: Sequence[bytes], args: argparse.Namespace) -> float:
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    if name in ("plain", "raw"):
        server = PlainServer()
        try:
            settings = settings_for(server.url, False, 1, prefix, args.batch)
            consume = consume_raw if name == "raw" else consume_forge
            return timed(settings, data, args.workers, consume)
        finally:
            server.stop()
    masters = 1 if name == "cluster-1" else 3
    with LocalCluster(masters=masters, durable=False) as cluster:
        settings = settings_for(cluster.url, True, PARTITIONS, prefix, args.batch)
        return timed(settings, data, args.workers, consume_forge)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    data = payloads(args.events)
    variants = ("raw", "plain", "cluster-1", "cluster-3")
    best: dict[str, float] = {}
    for round_ in range(args.repeat):
        for name in variants:
            elapsed = run_variant(name, data, args)
            best[name] = min(best.get(name, elapsed), elapsed)
            print(f"round {round_ + 1} {name:>9}: {len(data) / elapsed:>9,.0f} events/s")
    rate = {name: len(data) / seconds for name, seconds in best.items()}
    print(
        f"\nbest of {args.repeat}, {args.events} events, {args.workers} workers, batch {args.batch}"
    )
    for name in variants:
        print(f"{name:>9}: {rate[name]:>9,.0f} events/s  {rate[name] / rate['raw']:.2f}x raw")
    print(f"cluster-3 / cluster-1: {rate['cluster-3'] / rate['cluster-1']:.2f}x")
    print(f"cluster-3 / plain:     {rate['cluster-3'] / rate['plain']:.2f}x")


if __name__ == "__main__":
    main()
