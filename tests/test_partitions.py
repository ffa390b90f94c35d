"""Partitioned streams (FORGE_STREAM_PARTITIONS) on a plain Redis: the names, the
partitioning rule, and the runtime reading, settling and dead-lettering per partition.
The same checks on a real cluster are in test_redis_cluster.py."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import replace

import msgspec
import pytest
import redis
from redis.crc import key_slot

from forge.errors import ConfigError
from forge.events import NewData
from forge.keys import _SCOPED_FAMILIES, Keys, partition_tag
from forge.observability.merged import newest_completions
from forge.observability.metrics import Metrics
from forge.observability.status import snapshot
from forge.partitioning import partition_key, partition_of
from forge.runtime.completion_wait import completions_position, wait_for_completions
from forge.runtime.context import Context
from forge.runtime.deadletter import DeadLetterQueue, error_info
from forge.runtime.entries import id_key
from forge.runtime.handlers import Message, Outcome, Rejected, Succeeded
from forge.servers.embedded_redis import resolve_redis_url
from forge.settings import Settings
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.events import new_data
from tests.support.redis_helpers import running
from tests.support.workers import completions, drain, make_worker, pending

PARTITIONS = 3


@pytest.fixture
def pctx(ctx: Context) -> Iterator[Context]:
    """``ctx`` with three partitions."""
    partitioned = replace(ctx, settings=ctx.settings.replace(stream_partitions=PARTITIONS))
    yield partitioned
    partitioned.close()


def _succeed(messages: Sequence[Message[NewData]]) -> list[Outcome]:
    return [Succeeded({"collection": m.event.collection}) for m in messages]


def _publish(ctx: Context, event: dict[str, object]) -> tuple[str, str]:
    return ctx.broker.publish_input(ctx.keys.new_data, msgspec.json.encode(event))


# ---------------------------------------------------------------------- names


def test_one_partition_keeps_todays_names() -> None:
    keys = Keys(prefix="forge:")
    assert keys.parts == (keys,)
    assert keys.new_data == "forge:new-data"
    assert keys.physical_lanes(keys.training_requests) == (
        "forge:training-requests:high",
        "forge:training-requests",
        "forge:training-requests:low",
    )
    assert keys.done(keys.new_data, "e1") == "forge:done:forge:forge:new-data:e1"
    assert keys.route("m") == "forge:serving:route:m"
    assert keys.localize(keys.completions) == keys.completions


def test_everything_a_settlement_touches_shares_its_partitions_slot() -> None:
    keys = Keys(prefix="forge:", partitions=PARTITIONS)
    slots = set()
    for part in keys.parts:
        names = [
            *part.input_streams,
            *keys.lanes(part.training_requests),
            part.completions,
            part.model_versions,
            part.predictions,
            part.dead_letter,
            part.dead_letter_replays,
            part.dead_letter_replays_total,
            keys.done(part.new_data, "e1"),
            keys.last_error(part.new_data, "1-1"),
            keys.admission_wait(part.training_requests, "1-1"),
            part.localize(keys.model_versions),
        ]
        assert len({key_slot(n.encode()) for n in names}) == 1, names
        slots.add(key_slot(part.new_data.encode()))
    assert len(slots) == PARTITIONS
    serving = [keys.route("m"), keys.routes_epoch, keys.serving_changes, keys.prediction("p")]
    assert len({key_slot(n.encode()) for n in serving}) == 1


def test_physical_names_map_back_to_their_partition_and_logical_name() -> None:
    keys = Keys(prefix="forge:", partitions=PARTITIONS)
    high = keys.lane(keys.part(2).training_requests, "high")
    assert high == "forge:{p2-1}:training-requests:high"
    assert keys.part_of(high).partition == 2
    assert keys.lane_of(high) == ("forge:{p2-1}:training-requests", "high")
    assert keys.label(high) == "training-requests"
    assert keys.logical_name(high) == "forge:training-requests:high"
    assert keys.part(1).localize(keys.training_progress) == keys.training_progress
    assert keys.physical_outputs(keys.training_progress) == (keys.training_progress,)
    assert keys.done(high, "e1") == "forge:{p2-1}:done:forge:forge:training-requests:e1"
    # A tag of another partition count is no partition of this one.
    assert keys.part_of("forge:{p2}:new-data").partition is None
    with pytest.raises(ValueError, match="no partition 3"):
        keys.part(3)


@pytest.mark.parametrize("partitions", [1, 2, 3, 4, 7, 16])
def test_tags_spread_partitions_over_equal_slot_ranges(partitions: int) -> None:
    # What a cluster made with redis-cli --cluster create gives each of N masters.
    for index in range(partitions):
        slot = key_slot(partition_tag(index, partitions).encode())
        assert index * 16384 // partitions <= slot < (index + 1) * 16384 // partitions


def test_the_scoped_families_are_the_streams_a_settlement_writes() -> None:
    keys = Keys(prefix="x:")
    shorts = {keys.short(s) for s in (*keys.input_streams, *keys.output_streams)}
    assert shorts - {"training-progress"} <= _SCOPED_FAMILIES


def test_a_cluster_of_one_partition_is_still_tagged() -> None:
    keys = Keys(prefix="forge:", cluster=True)
    assert keys.physical(keys.new_data) == ("forge:{p0}:new-data",)
    assert partition_tag(0, 1) == "p0"


# ---------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("event", "key"),
    [
        ({"id": "e1", "collection": "docs", "model": "m"}, "docs"),
        ({"id": "e1", "model": "m"}, "m"),
        ({"id": "e1"}, "e1"),
        ({"nothing": 1}, ""),
    ],
)
def test_the_rule_hashes_collection_then_model_then_id(event: dict[str, str], key: str) -> None:
    assert partition_key(msgspec.json.encode(event)) == key


def test_the_rule_is_crc32_modulo_the_partitions() -> None:
    # What docs/redis-cluster.md shows, and any client can compute.
    assert partition_of("docs", 3) == zlib.crc32(b"docs") % 3 == 1
    assert partition_of("docs", 1) == 0
    assert partition_key(b"not json") == ""


# ---------------------------------------------------------------------- settings


def test_partitions_are_checked() -> None:
    with pytest.raises(ConfigError, match="stream_partitions must be 1-256"):
        Settings(stream_partitions=0)
    with pytest.raises(ConfigError, match="must not contain braces"):
        Settings(stream_partitions=2, stream_prefix="{x}:")
    settings = Settings.from_env({"FORGE_STREAM_PARTITIONS": "4", "FORGE_REDIS_CLUSTER": "yes"})
    assert (settings.stream_partitions, settings.redis_cluster) == (4, True)


def test_a_cluster_needs_a_url() -> None:
    with pytest.raises(ConfigError, match="needs REDIS_URL"):
        resolve_redis_url(Settings(redis_cluster=True))


# ---------------------------------------------------------------------- the runtime


def test_events_spread_over_partitions_and_each_settles_in_its_own(pctx: Context) -> None:
    collections = [f"c{i}" for i in range(12)]
    published = [_publish(pctx, new_data(f"e{i}", collection=c)) for i, c in enumerate(collections)]
    used = {stream for stream, _ in published}
    assert len(used) == PARTITIONS  # twelve collections reach all three
    for (stream, _), c in zip(published, collections, strict=True):
        rule = partition_of(c, PARTITIONS)
        assert stream == pctx.keys.part(rule).new_data
    drain(make_worker(pctx, _succeed), pctx, len(collections))
    assert pending(pctx) == 0
    for part in pctx.keys.parts:
        for _, fields in pctx.redis.xrange(part.completions):
            done = msgspec.json.decode(fields[b"event"])
            assert pctx.keys.part_of(done["source_stream"]) == part
    merged = newest_completions(pctx.redis, pctx.keys, 100)
    assert len(merged) == len(collections)
    ids = [id_key(entry_id) for entry_id, _, _ in merged]
    assert ids == sorted(ids, reverse=True)  # newest first, across partitions


def test_a_republished_event_goes_to_its_partition_and_is_a_duplicate(pctx: Context) -> None:
    worker = make_worker(pctx, _succeed)
    _publish(pctx, new_data("e1", collection="docs"))
    drain(worker, pctx, 1)
    stream, _ = _publish(pctx, new_data("e1", collection="docs"))
    assert stream == pctx.keys.part(partition_of("docs", PARTITIONS)).new_data
    drain(make_worker(pctx, _succeed), pctx, 2)
    first, second = completions(pctx)
    assert (first.duplicate, second.duplicate) == (False, True)


def test_writing_to_any_partition_is_valid(pctx: Context) -> None:
    target = pctx.keys.part(0).new_data
    stream, _ = pctx.broker.publish_input(target, msgspec.json.encode(new_data("e1")))
    assert stream == target
    drain(make_worker(pctx, _succeed), pctx, 1)
    assert completions(pctx)[0].source_stream == target


def test_a_poison_event_dead_letters_in_its_partition_and_replays(pctx: Context) -> None:
    rejected = {"yes": True}

    def handle(messages: Sequence[Message[NewData]]) -> list[Outcome]:
        if rejected["yes"]:
            return [Rejected(error_info(ValueError("poison"))) for _ in messages]
        return _succeed(messages)

    stream, _ = _publish(pctx, new_data("e1", collection="docs"))
    part = pctx.keys.part_of(stream)
    drain(make_worker(pctx, handle), pctx, 1)
    dlq = DeadLetterQueue(pctx.broker)
    (item,) = dlq.select()
    assert item.partition == part.partition
    assert item.ref == f"{part.partition}/{item.entry_id}"
    assert dlq.show(item.ref) == dlq.show(item.entry_id) == item
    assert dlq.depth() == 1
    assert snapshot(pctx.redis, pctx.keys).dead_letter_depth == 1
    rejected["yes"] = False
    (new_id,) = dlq.replay([item])
    assert pctx.redis.xrange(stream, new_id, new_id)
    drain(make_worker(pctx, handle), pctx, 2)
    assert completions(pctx)[-1].status == "succeeded"
    assert dlq.depth() == 0
    assert dlq.replays_total() == 1
    assert dlq.replay_counts(["e1"]) == [1]


def test_purge_empties_every_partition(pctx: Context) -> None:
    def reject(messages: Sequence[Message[NewData]]) -> list[Outcome]:
        return [Rejected(error_info(ValueError("poison"))) for _ in messages]

    for i in range(6):
        _publish(pctx, new_data(f"e{i}", collection=f"c{i}"))
    drain(make_worker(pctx, reject), pctx, 6)
    dlq = DeadLetterQueue(pctx.broker)
    assert {e.partition for e in dlq.select()} == set(range(PARTITIONS))
    first = dlq.select(limit=1)
    assert dlq.purge(first) == 1
    assert dlq.purge(None) == PARTITIONS
    assert dlq.depth() == 0


def test_waiting_for_completions_follows_every_partition(pctx: Context) -> None:
    since = completions_position(pctx.broker)
    assert set(since) == set(pctx.keys.physical_outputs(pctx.keys.completions))
    published = {_publish(pctx, new_data(f"e{i}", collection=f"c{i}")): f"e{i}" for i in range(6)}
    worker = make_worker(pctx, _succeed)
    worker.ctx.broker.ensure_groups(worker.streams)
    with running(worker):
        arrived = wait_for_completions(
            pctx.broker, published, since=since, timeout_s=10, on_completion=lambda c: None
        )
    assert {c.source_id for c in arrived} == set(published.values())


def test_status_lists_each_partitions_streams(pctx: Context, redis_client: redis.Redis) -> None:
    make_worker(pctx, _succeed).ctx.broker.ensure_groups(pctx.keys.input_lanes)
    snap = snapshot(redis_client, pctx.keys)
    names = [s.stream for s in snap.streams]
    assert pctx.keys.part(2).new_data in names
    assert pctx.keys.new_data not in names


def test_the_completions_command_merges_every_partition(
    pctx: Context,
    cli_env: Context,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FORGE_STREAM_PARTITIONS", str(PARTITIONS))
    for i in range(6):
        _publish(pctx, new_data(f"e{i}", collection=f"c{i}"))
    drain(make_worker(pctx, _succeed), pctx, 6)
    code, out, _ = run_cli(capsys, "completions", "--json")
    assert code == 0
    rows = json.loads(out)
    assert sorted(r["completion"]["source_id"] for r in rows) == [f"e{i}" for i in range(6)]
    assert len({r["stream"] for r in rows}) == PARTITIONS
    code, out, _ = run_cli(capsys, "completions", "--limit", "2")
    assert len(out.strip().splitlines()) == 3  # the header and two rows


# ---------------------------------------------------------------------- operators' views


@pytest.fixture
def three_dead_letters(pctx: Context, cli_env: Context, monkeypatch: pytest.MonkeyPatch) -> Context:
    """``forge`` commands on three partitions, one dead letter in each."""
    monkeypatch.setenv("FORGE_STREAM_PARTITIONS", str(PARTITIONS))

    def reject(messages: Sequence[Message[NewData]]) -> list[Outcome]:
        return [Rejected(error_info(ValueError("poison"))) for _ in messages]

    for i in range(3):
        _publish(pctx, new_data(f"e{i}", collection=f"c{i}"))  # c0, c1, c2: all partitions
    drain(make_worker(pctx, reject), pctx, 3)
    return pctx


@pytest.mark.usefixtures("three_dead_letters")
def test_the_dlq_commands_work_across_partitions(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "dlq", "list", "--json")
    assert code == 0
    listed = json.loads(out)
    assert {r["partition"] for r in listed} == set(range(PARTITIONS))
    ref = listed[0]["ref"]
    assert ref == f"{listed[0]['partition']}/{listed[0]['entry_id']}"
    code, out, _ = run_cli(capsys, "dlq", "show", ref)
    assert code == 0
    assert f"entry_id: {ref}" in out
    code, out, _ = run_cli(capsys, "dlq", "show", listed[0]["entry_id"], "--json")
    assert code == 0
    assert json.loads(out)["ref"] == ref
    code, out, err = run_cli(capsys, "dlq", "show", "7/1-1")
    assert_one_line_error(code, err, "no partition 7: FORGE_STREAM_PARTITIONS is 3")
    code, out, _ = run_cli(capsys, "dlq", "replay", ref)
    assert code == 0
    assert out.startswith(f"{ref} -> ")
    code, out, _ = run_cli(capsys, "dlq", "purge", "--all")
    assert (code, out) == (0, "purged 2\n")


def test_status_watch_and_metrics_see_every_partition(
    three_dead_letters: Context, capsys: pytest.CaptureFixture[str]
) -> None:
    pctx = three_dead_letters
    code, out, _ = run_cli(capsys, "status", "--json")
    assert code == 0
    status = json.loads(out)
    assert status["dead_letter_depth"] == 3
    streams = {s["stream"] for s in status["streams"]}
    assert set(pctx.keys.physical(pctx.keys.new_data)) <= streams
    code, out, _ = run_cli(capsys, "watch", "--once")
    assert code == 0
    assert out.count("dead-lettered") >= 3  # every partition's completions, merged
    metrics = Metrics(gpu=False)
    metrics.watch_streams(lambda: pctx.redis, pctx.keys, pctx.keys.input_lanes)
    body = metrics.render()[0].decode()
    assert "forge_dead_letter_depth 3.0" in body
    for stream in pctx.keys.physical(pctx.keys.new_data):
        assert f'forge_stream_length{{stream="{pctx.keys.short(stream)}"}} 1.0' in body
