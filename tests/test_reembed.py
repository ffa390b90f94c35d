"""Re-embedding a collection with another real model while it serves: the reembed
event plans batches, writes during the backfill go to both versions, the last batch
switches atomically; rollback and drop-version. Real PostgreSQL, the packaged model
and a second model built offline (tests/support/second_model.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from consumers import register
from consumers.new_data import NewDataHandler
from consumers.new_data_stream import NewDataStream
from consumers.once import Once
from consumers.reembed import ReembedHandler
from forge.embedding.model import Embedder
from forge.embedding.model_cache import ModelCache
from forge.embedding.search import Searcher
from forge.embedding.service import EmbeddingService
from forge.events import NewData, Reembed, ReembedBatch
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, Message, Outcome, Succeeded
from forge.runtime.worker import Worker
from forge.vectorstore import VectorStore
from tests.support.cli import REPO, assert_one_line_error, run_cli
from tests.support.events import publish
from tests.support.redis_helpers import TEST_REDIS_URL, running, wait_for
from tests.support.second_model import SECOND_DIMENSION, SECOND_MODEL, save_second_model
from tests.support.workers import completions, pending

pytestmark = pytest.mark.postgres

TEXTS = [
    "My order arrived broken and I would like a refund.",
    "The package was damaged, please send my money back.",
    "I cannot log in to my account since yesterday.",
    "Password reset emails never arrive.",
    "When will my parcel arrive? Tracking has not moved.",
    "Do you ship to Canada?",
    "The invoice shows the wrong billing address.",
    "How do I change the card I pay with?",
    "The app crashes when I open settings.",
    "Please delete my account and my data.",
]

REEMBED = {"type": "reembed", "id": "re1", "model": SECOND_MODEL, "batch_records": 4}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    save_second_model(folder)
    return folder


@pytest.fixture
def stream(
    ctx: Context, models_dir: Path, vector_store: VectorStore, embedder: Embedder
) -> NewDataStream:
    settings = ctx.settings.replace(model_dir=models_dir)
    models = ModelCache.from_settings(settings)
    models.get_or_load(f"embedder:{embedder.name}", lambda: embedder, lambda e: e.size_bytes)
    service = EmbeddingService(settings, models, None)
    store = Once(lambda: vector_store)
    return NewDataStream(
        NewDataHandler(settings, store, service), ReembedHandler(settings, store, service)
    )


def message(payload: dict[str, Any], stream_name: str) -> Message[Any]:
    event = msgspec.convert(payload, NewData | Reembed | ReembedBatch)
    return Message(event, stream_name, "1-0", 1)


def handle(stream: NewDataStream, scope: str, *payloads: dict[str, Any]) -> list[Outcome]:
    return stream([message(p, scope) for p in payloads])


def new_data(event_id: str, collection: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "new-data", "id": event_id, "collection": collection, "records": records}


def succeeded(outcome: Outcome) -> Succeeded:
    assert isinstance(outcome, Succeeded), outcome
    return outcome


def test_reembedding_with_a_second_model_switches_only_when_complete(
    stream: NewDataStream,
    vector_store: VectorStore,
    collection_name: str,
    models_dir: Path,
) -> None:
    name, scope = collection_name, f"test:{collection_name}:new-data"
    records = [{"id": f"r{i}", "text": t, "metadata": {"i": i}} for i, t in enumerate(TEXTS)]
    handle(stream, scope, new_data("load", name, records))
    reembed = {"type": "reembed", "id": "re1", "collection": name}
    (planned,) = handle(stream, scope, {**reembed, "model": SECOND_MODEL})
    plan = succeeded(planned)
    assert plan.result["collection_version"] == 2
    assert plan.result["batches"] == 1  # MAX_BATCH_SIZE records per batch by default
    (again,) = handle(stream, scope, {**reembed, "model": SECOND_MODEL})
    assert succeeded(again).publish == plan.publish  # a redelivery publishes the same
    batches = [event for _, event in plan.publish]
    assert vector_store.versions.building(name).version == 2  # type: ignore[union-attr]

    # During the backfill: writes and deletes go to both versions.
    live = [
        {"id": "r0", "text": "Where is the nearest store?", "metadata": {"i": 0}},
        {"id": "r1", "deleted": True},
        {"id": "r99", "text": "Refund my broken order now", "metadata": {"i": 99}},
        {"id": "r2", "text": TEXTS[2], "metadata": {"i": 2, "vip": True}},
    ]
    (during,) = handle(stream, scope, new_data("live", name, live))
    assert succeeded(during).result["metadata_updated"] == 1
    vector = {"id": "v", "vector": [0.1] * 384}
    (refused,) = handle(stream, scope, new_data("vec", name, [vector]))
    assert "re-embedded" in str(refused)
    hits = Searcher(vector_store, stream.records.embedding).search(name, "refund", k=3)  # type: ignore[attr-defined]
    assert len(hits) == 3  # the old version still serves

    (done,) = handle(stream, scope, *(msgspec.to_builtins(b) for b in batches))
    assert succeeded(done).result["switched"] is True
    active = vector_store.collection(name)
    assert active is not None
    assert (active.version, active.model, active.dimension) == (2, SECOND_MODEL, 128)
    ids = [*sorted(f"r{i}" for i in range(10) if i != 1), "r99"]
    stored = vector_store.fetch(name, ids)
    assert sorted(stored) == sorted(ids)
    assert vector_store.count(name) == len(ids)
    assert stored["r0"].text == "Where is the nearest store?"
    assert stored["r2"].metadata == {"i": 2, "vip": True}
    assert {r.model for r in stored.values()} == {SECOND_MODEL}
    assert all(np.shape(r.embedding) == (SECOND_DIMENSION,) for r in stored.values())
    versions = {r.model_version for r in stored.values()}
    assert len(versions) == 1
    service = stream.records.embedding  # type: ignore[attr-defined]
    hits = Searcher(vector_store, service).search(name, "I want a refund for my broken order", k=2)
    assert {h.id for h in hits} & {"r99", "r0"} == {"r99"}


def test_the_cli_shows_rolls_back_and_drops_versions(
    stream: NewDataStream,
    vector_store: VectorStore,
    collection_name: str,
    cli_env: Context,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("POSTGRES_URL", pg_url)
    name, scope = collection_name, f"test:{collection_name}:new-data"
    records = [{"id": f"r{i}", "text": t} for i, t in enumerate(TEXTS[:4])]
    handle(stream, scope, new_data("load", name, records))
    # The same model again (after a library upgrade, say), two records per batch.
    reembed = {"type": "reembed", "id": "re1", "collection": name, "batch_records": 2}
    (planned,) = handle(stream, scope, reembed)
    batches = [msgspec.to_builtins(event) for _, event in succeeded(planned).publish]
    assert len(batches) == 2
    handle(stream, scope, batches[0])
    code, out, _ = run_cli(capsys, "collections", "show", name, "--json")
    shown = json.loads(out)
    assert shown["active_version"] == 1
    building = shown["versions"][1]
    assert (building["state"], building["batches_done"], building["batches_total"]) == (
        "building",
        1,
        2,
    )
    handle(stream, scope, batches[1])
    code, out, _ = run_cli(capsys, "collections", "show", name, "--json")
    assert [(v["version"], v["state"], v["rows"]) for v in json.loads(out)["versions"]] == [
        (1, "retired", 4),
        (2, "active", 4),
    ]
    code, out, _ = run_cli(capsys, "collections", "rollback", name)
    assert (code, out) == (0, f"collection {name}: version 1 active (model all-MiniLM-L6-v2)\n")
    code, _, err = run_cli(capsys, "collections", "drop-version", name, "1")
    assert_one_line_error(code, err, "active version")
    code, out, _ = run_cli(capsys, "collections", "drop-version", name, "2")
    assert (code, out) == (0, f"collection {name}: version 2 (retired) dropped\n")
    code, _, err = run_cli(capsys, "collections", "reembed", name, "--model", "../etc")
    assert_one_line_error(code, err, "model")


def test_a_worker_killed_mid_backfill_loses_and_doubles_nothing(
    stream: NewDataStream,
    ctx: Context,
    vector_store: VectorStore,
    collection_name: str,
    models_dir: Path,
    pg_url: str,
) -> None:
    name = collection_name
    records = [{"id": f"r{i:02d}", "text": f"{TEXTS[i % 10]} ({i})"} for i in range(20)]
    handle(stream, ctx.keys.new_data, new_data("load", name, records))
    publish(ctx.redis, ctx.keys.new_data, {**REEMBED, "collection": name})
    live = [{"id": "r00", "text": "changed during the backfill"}, {"id": "r01", "deleted": True}]
    publish(ctx.redis, ctx.keys.new_data, new_data("live", name, live))
    env = dict(
        os.environ,
        REDIS_URL=TEST_REDIS_URL,
        POSTGRES_URL=pg_url,
        FORGE_STREAM_PREFIX=ctx.settings.stream_prefix,
        FORGE_HOME=str(ctx.settings.home_dir),
        FORGE_MODEL_DIR=str(models_dir),
        FORGE_READ_BLOCK_S="0.05",
        TEST_CRASH_BATCH="2",
    )
    crash = "tests.support.consumers:register_crash_in_backfill"
    argv = [sys.executable, "-m", "forge.cli.main", "worker", "--http-port", "0"]
    proc = subprocess.run(
        [*argv, "--consumers", crash],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    building = vector_store.versions.building(name)
    assert building is not None
    assert (building.batches_done, building.batches_total) == (3, 5)  # 0, 1, 2 committed
    assert pending(ctx) == 1  # batch 2, never acked

    # Another worker reclaims the dead one's batch and finishes the backfill.
    settings = ctx.settings.replace(model_dir=models_dir, postgres_url=pg_url, claim_min_idle_s=0.2)
    worker_ctx = replace(ctx, settings=settings)
    registry = HandlerRegistry()
    register(registry, worker_ctx)
    worker = Worker(worker_ctx, registry, streams=[ctx.keys.new_data])
    with running(worker):
        wait_for(lambda: len(completions(ctx)) >= 7, 120)
    done = {c.source_id: c for c in completions(ctx)}
    batch_ids = sorted(i for i in done if i and ":" in i)
    assert len(batch_ids) == 5
    assert all(done[i].status == "succeeded" for i in done)
    assert [done[i].result.get("duplicate", False) for i in batch_ids] == [
        False,
        False,
        True,
        False,
        False,
    ]
    assert pending(ctx) == 0
    active = vector_store.collection(name)
    assert active is not None
    assert (active.version, active.model) == (2, SECOND_MODEL)
    info = vector_store.describe(name)
    assert [(v.state, v.rows, v.batches_done) for v in info.versions] == [
        ("retired", 19, 0),
        ("active", 19, 5),
    ]
    stored = vector_store.fetch(name, [f"r{i:02d}" for i in range(20)])
    assert sorted(stored) == [f"r{i:02d}" for i in range(20) if i != 1]
    assert stored["r00"].text == "changed during the backfill"
    assert {r.model for r in stored.values()} == {SECOND_MODEL}


def test_the_reembed_command_publishes_a_reembed_event(
    cli_env: Context, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["collections", "reembed", "tickets", "--model", SECOND_MODEL, "--batch-records", "3"]
    code, out, err = run_cli(capsys, *argv, "--storage", "halfvec")
    assert code == 0, err
    ((entry_id, fields),) = cli_env.redis.xrange(cli_env.keys.new_data)
    assert out == f"{entry_id.decode()}\n"
    event = msgspec.json.decode(fields[b"event"], type=Reembed)
    assert (event.collection, event.model, event.batch_records, event.storage) == (
        "tickets",
        SECOND_MODEL,
        3,
        "halfvec",
    )


def load_and_plan(stream: NewDataStream, scope: str, name: str, event_id: str) -> list[Any]:
    """Load ``TEXTS`` into ``name``, then plan its re-embedding with the second model in
    batches of 3 records; the backfill events, as dicts."""
    records = [{"id": f"r{i}", "text": t} for i, t in enumerate(TEXTS)]
    handle(stream, scope, new_data("load", name, records))
    reembed = {"type": "reembed", "id": event_id, "collection": name, "batch_records": 3}
    plan = succeeded(handle(stream, scope, {**reembed, "model": SECOND_MODEL})[0])
    return [msgspec.to_builtins(event) for _, event in plan.publish]


def test_a_read_of_several_backfill_batches_answers_each_in_order(
    stream: NewDataStream, vector_store: VectorStore, collection_name: str
) -> None:
    """Each batch's write runs beside the next batch's embedding; the read's outcomes
    still name their own batch, and only the last switches."""
    name, scope = collection_name, f"test:{collection_name}:new-data"
    batches = load_and_plan(stream, scope, name, "re-many")
    assert len(batches) == 4

    results = [succeeded(o).result for o in handle(stream, scope, *batches)]
    assert [r["batch"] for r in results] == [0, 1, 2, 3]
    assert [r["switched"] for r in results] == [False, False, False, True]
    assert sum(r["rows"] for r in results) == len(TEXTS)
    active = vector_store.collection(name)
    assert active is not None
    assert (active.version, active.model) == (2, SECOND_MODEL)
    assert vector_store.count(name) == len(TEXTS)
    # Delivered again: each batch answers as the duplicate it is, nothing rewritten.
    again = [succeeded(o).result for o in handle(stream, scope, *batches)]
    assert all(r["duplicate"] for r in again)
    assert vector_store.count(name) == len(TEXTS)


def test_backfill_reads_in_flight_together_write_every_batch_once(
    stream: NewDataStream, vector_store: VectorStore, collection_name: str
) -> None:
    """Two reads at once, as a worker's two slots run them: they take turns in the
    model, each queueing its writes, and together they switch exactly once."""
    name, scope = collection_name, f"test:{collection_name}:new-data"
    batches = load_and_plan(stream, scope, name, "re-two")
    with futures.ThreadPoolExecutor(2) as pool:
        reads = [pool.submit(handle, stream, scope, *part) for part in (batches[:2], batches[2:])]
        results = [succeeded(o).result for read in reads for o in read.result()]
    assert sorted(r["batch"] for r in results) == [0, 1, 2, 3]
    assert sum(r["switched"] for r in results) == 1
    assert sum(r["rows"] for r in results) == len(TEXTS)
    active = vector_store.collection(name)
    assert active is not None
    assert (active.version, active.model) == (2, SECOND_MODEL)
    assert vector_store.count(name) == len(TEXTS)
