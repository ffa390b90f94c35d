"""Forge on a real Redis Cluster of three masters (tests/cluster_fixtures.py), with
three partitions: the runtime settling in each partition's slot, dead letters and their
replay, a SIGKILLed worker, a master restarting under load, and a real ``forge worker``
embedding and training end to end. tests/test_partitions.py checks the same runtime on
one plain server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest

from forge.events import NewData
from forge.observability.metrics import Metrics
from forge.runtime.context import Context
from forge.runtime.deadletter import DeadLetterQueue, error_info
from forge.runtime.handlers import Message, Outcome, Rejected, Succeeded
from forge.servers.connect import connect_redis
from forge.serving.feedback import FeedbackItem, FeedbackJoin
from forge.serving.records import PredictionLog, Served
from forge.serving.routing import Route, RouteStore
from forge.settings import Settings
from tests.support.cli import run_cli, run_forge
from tests.support.events import new_data
from tests.support.redis_cluster import LocalCluster
from tests.support.redis_helpers import running, wait_for
from tests.support.workers import completions, drain, make_worker, pending

pytestmark = pytest.mark.slow

PARTITIONS = 3


@pytest.fixture
def cctx(redis_cluster: LocalCluster, cluster_prefix: str, settings: Settings) -> Iterator[Context]:
    """The suite's fast test settings (tests/conftest.py), on the cluster."""
    settings = settings.replace(
        redis_url=redis_cluster.url,
        redis_cluster=True,
        stream_partitions=PARTITIONS,
        stream_prefix=cluster_prefix,
    )
    client = connect_redis(redis_cluster.url, cluster=True)
    ctx = Context(settings=settings, redis=client, metrics=Metrics(gpu=False))
    yield ctx
    ctx.close()
    client.close()


def _succeed(messages: Sequence[Message[NewData]]) -> list[Outcome]:
    return [Succeeded({"n": len(m.event.records)}) for m in messages]


def _publish_many(ctx: Context, count: int, start: int = 0) -> list[str]:
    """``count`` events of as many collections, spread over the partitions by the rule."""
    ids = []
    for i in range(start, start + count):
        payload = msgspec.json.encode(new_data(f"e{i}", collection=f"c{i}"))
        ctx.broker.publish_input(ctx.keys.new_data, payload)
        ids.append(f"e{i}")
    return ids


def _effects(ctx: Context) -> dict[str, int]:
    """How many first (not duplicate) completions each event has."""
    counts: dict[str, int] = {}
    for done in completions(ctx):
        if not done.duplicate and done.source_id:
            counts[done.source_id] = counts.get(done.source_id, 0) + 1
    return counts


def _worker_env(ctx: Context, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        REDIS_URL=ctx.settings.redis_url or "",
        FORGE_REDIS_CLUSTER="true",
        FORGE_STREAM_PARTITIONS=str(PARTITIONS),
        FORGE_STREAM_PREFIX=ctx.settings.stream_prefix,
        FORGE_HOME=str(ctx.settings.home_dir),
        FORGE_READ_BLOCK_S="0.05",
        FORGE_HTTP_PORT="0",
        FORGE_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def test_the_partitions_live_on_three_masters(cctx: Context, redis_cluster: LocalCluster) -> None:
    nodes = {redis_cluster.node_for_key(part.new_data) for part in cctx.keys.parts}
    assert nodes == {0, 1, 2}


def test_every_partition_is_read_and_settled_in_its_slot(cctx: Context) -> None:
    ids = _publish_many(cctx, 30)
    drain(make_worker(cctx, _succeed), cctx, len(ids))
    assert pending(cctx) == 0
    assert _effects(cctx) == dict.fromkeys(ids, 1)
    for part in cctx.keys.parts:
        entries = cctx.redis.xrange(part.completions)
        assert entries  # thirty collections reach every partition
        for _, fields in entries:
            done = msgspec.json.decode(fields[b"event"])
            assert cctx.keys.part_of(done["source_stream"]) == part


def test_poison_is_dead_lettered_in_its_partition_and_replays(cctx: Context) -> None:
    poisoned = {"on": True}

    def handle(messages: Sequence[Message[NewData]]) -> list[Outcome]:
        if poisoned["on"]:
            return [Rejected(error_info(ValueError("poison"))) for _ in messages]
        return _succeed(messages)

    ids = _publish_many(cctx, 6)
    drain(make_worker(cctx, handle), cctx, len(ids))
    dlq = DeadLetterQueue(cctx.broker)
    records = dlq.select()
    assert sorted(r.record.source_id or "" for r in records) == sorted(ids)
    assert {r.partition for r in records} == set(range(PARTITIONS))
    poisoned["on"] = False
    dlq.replay(records)
    drain(make_worker(cctx, handle), cctx, 2 * len(ids))
    assert dlq.depth() == 0
    assert dlq.replays_total() == len(ids)
    assert [c.status for c in completions(cctx)[len(ids) :]] == ["succeeded"] * len(ids)


def test_a_sigkilled_workers_entries_are_reclaimed(cctx: Context) -> None:
    # One collection, so one partition: the slow handler takes all three in one batch.
    ids = [f"e{i}" for i in range(3)]
    for event_id in ids:
        payload = msgspec.json.encode(new_data(event_id, collection="one"))
        cctx.broker.publish_input(cctx.keys.new_data, payload)
    cmd = [sys.executable, "-m", "forge.cli.main", "worker"]
    cmd += ["--consumers", "tests.support.consumers:register_slow"]
    env = _worker_env(cctx, TEST_HANDLER_SLEEP_S="60")
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = f"{cctx.keys.prefix}started"
        wait_for(lambda: cctx.redis.llen(started) == 3, timeout_s=60)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    assert pending(cctx) == 3
    quick = replace(cctx, settings=cctx.settings.replace(claim_min_idle_s=0.5))
    with running(make_worker(quick, _succeed)):
        wait_for(lambda: len(completions(cctx)) == 3, timeout_s=60)
    assert _effects(cctx) == dict.fromkeys(ids, 1)
    assert {c.deliveries for c in completions(cctx)} == {2}
    assert pending(cctx) == 0


def test_a_master_restart_loses_nothing_and_doubles_nothing(
    cctx: Context, redis_cluster: LocalCluster
) -> None:
    first = _publish_many(cctx, 30)
    release = threading.Event()

    def handle(messages: Sequence[Message[NewData]]) -> list[Outcome]:
        release.wait(30)  # hold the first batches until the master is down
        return _succeed(messages)

    victim = redis_cluster.node_for_key(cctx.keys.part(1).new_data)
    worker = make_worker(cctx, handle)
    worker.ctx.broker.ensure_groups(worker.streams)
    with running(worker):
        wait_for(lambda: pending(cctx) > 0, timeout_s=30)
        redis_cluster.kill(victim)  # SIGKILL: AOF with fsync on every write keeps all
        release.set()
        redis_cluster.start(victim)
        later = _publish_many(cctx, 30, start=30)
        wait_for(lambda: len(_effects(cctx)) == 60, timeout_s=120)
    assert _effects(cctx) == dict.fromkeys(first + later, 1)
    assert pending(cctx) == 0


@pytest.mark.usefixtures("embedder")
def test_a_real_worker_embeds_and_trains_on_the_cluster(
    cctx: Context, pg_url: str, collection_name: str
) -> None:
    env = _worker_env(cctx, POSTGRES_URL=pg_url, FORGE_TRAINING_TIMEOUT_S="300")
    cmd = [sys.executable, "-m", "forge.cli.main", "worker"]
    worker = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    collection = collection_name
    records = [
        {"id": f"r{i}", "text": text, "metadata": {"label": label}}
        for i, (text, label) in enumerate(_LABELLED * 4)
    ]
    try:
        data = {"type": "new-data", "id": "load-1", "collection": collection, "records": records}
        published = run_forge(env, "publish", "new-data", json.dumps(data), "--wait")
        assert published.returncode == 0, published.stderr
        request = {
            "type": "training-request",
            "id": "train-1",
            "model": f"{collection}-clf",
            "task": "classifier",
            "collection": collection,
            "params": {"label_field": "label", "epochs": 3},
        }
        trained = run_forge(env, "publish", "training-requests", json.dumps(request), "--wait")
        assert trained.returncode == 0, trained.stdout + trained.stderr
        found = run_forge(env, "search", collection, "the invoice was wrong", "--json")
        assert found.returncode == 0, found.stderr
        assert json.loads(found.stdout)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    done = {c.source_id: c for c in completions(cctx)}
    assert done["load-1"].status == "succeeded"
    assert done["train-1"].status == "succeeded"
    assert done["train-1"].result["model_version"] == 1
    announced = [
        e for s in cctx.keys.physical(cctx.keys.model_versions) for e in cctx.redis.xrange(s)
    ]
    assert len(announced) == 1


_LABELLED = [
    ("my invoice shows the wrong amount", "billing"),
    ("I was charged twice this month", "billing"),
    ("the refund never arrived", "billing"),
    ("the app crashes when I log in", "bug"),
    ("the page shows an error after saving", "bug"),
    ("the export button does nothing", "bug"),
]


def test_a_backup_of_the_cluster_restores_every_partition(
    cctx: Context,
    redis_cluster: LocalCluster,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    for name, value in _worker_env(cctx).items():
        monkeypatch.setenv(name, value)
    ids = _publish_many(cctx, 9)
    drain(make_worker(cctx, _succeed), cctx, len(ids))
    waiting = _publish_many(cctx, 3, start=9)  # left unread: lag to restore
    before = _state(cctx)
    backup = tmp_path / "backup"
    only_redis = ("--exclude", "postgres", "--exclude", "mlflow")
    code, _, err = run_cli(capsys, "backup", "create", str(backup), *only_redis)
    assert code == 0, err
    for key in list(cctx.redis.scan_iter(match=f"{cctx.keys.prefix}*", count=1000)):
        cctx.redis.delete(key)  # a wipe across every master
    code, _, err = run_cli(capsys, "backup", "restore", str(backup))
    assert code == 0, err
    assert _state(cctx) == before
    drain(make_worker(cctx, _succeed), cctx, len(ids) + len(waiting))
    assert _effects(cctx) == dict.fromkeys(ids + waiting, 1)


def _state(ctx: Context) -> dict[str, object]:
    """Every partition's streams and group positions, and the markers."""
    found: dict[str, object] = {}
    for stream in (*ctx.keys.input_lanes, *ctx.keys.physical_outputs(ctx.keys.completions)):
        if ctx.redis.exists(stream):
            found[stream] = ctx.redis.xrange(stream)
            found[f"{stream} groups"] = [
                (g["name"], g["last-delivered-id"], g["pending"])
                for g in ctx.redis.xinfo_groups(stream)
            ]
    markers = ctx.redis.scan_iter(match=f"{ctx.keys.prefix}*done:*", count=1000)
    found["markers"] = sorted(markers)
    return found


def test_serving_state_lives_in_one_slot_of_the_cluster(cctx: Context) -> None:
    keys, client = cctx.keys, cctx.redis
    routes = RouteStore(client, keys)
    routes.put("m", Route())  # route, epoch and change notice in one transaction
    assert routes.epoch() == 1
    log = PredictionLog(client, keys, 60)
    log.record(
        [
            Served("p1", "m", 1, "champion", ["a", "b"], 0.001),
            Served("p2", "m", 1, "champion", ["c"], 0.002),
        ]
    )
    joined, found = FeedbackJoin(client, keys, window_s=60).join(
        [FeedbackItem("f1", "p1", 0, "a"), FeedbackItem("f2", "p2", 0, "x")]
    )
    assert [j.counts for j in joined if not isinstance(j, Exception)] == [{1: (1, 1)}, {1: (2, 1)}]
    assert found == {"m": Route()}
    stats = client.hgetall(keys.variant_stats("m", 1))
    assert (stats[b"predictions"], stats[b"feedback"], stats[b"correct"]) == (b"3", b"2", b"1")
    # What a server's reload reads in one pipeline: the epoch, then each partition's
    # model-versions stream (one XREAD a slot).
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.routes_epoch)
    for stream in keys.physical(keys.model_versions):
        pipe.xread({stream: "0-0"}, 10)
    epoch, *versions = pipe.execute()
    assert (int(epoch), versions) == (1, [[]] * PARTITIONS)
