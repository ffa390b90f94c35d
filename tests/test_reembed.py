"""Re-embedding a collection with another real model while it serves: the reembed
event plans batches, writes during the backfill go to both versions, the last batch
switches atomically; rollback and drop-version. Real PostgreSQL, the packaged model
and a second model built offline (tests/support/second_model.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

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
from forge.runtime.handlers import Message, Outcome, Succeeded
from forge.vectorstore import VectorStore
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.second_model import SECOND_DIMENSION, SECOND_MODEL, save_second_model

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
    assert vector_store.building_version(name).version == 2  # type: ignore[union-attr]

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
