"""Unchanged content is not embedded again: each row records its text's hash and the
model (name and weights version) that embedded it, and an upsert that would remake the
same row makes no model call and no write. Real PostgreSQL; a stub model that counts
its calls."""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg
from psycopg import sql

from consumers.new_data import NewDataHandler
from consumers.once import Once
from forge.events import NewData
from forge.runtime.handlers import Message, Succeeded
from forge.settings import Settings
from forge.vectorstore import VectorStore, table_name, text_hash
from tests.test_embed_pipeline import StubEmbedding


class VersionedStub(StubEmbedding):
    """The stub model, with a weights version the test can change."""

    def __init__(self) -> None:
        super().__init__()
        self.version = "v1"

    def embedder(self, name: str | None = None) -> Any:
        return type("E", (), {"name": "stub-model", "version": self.version})()


def new_data(
    collection: str, event_id: str, records: list[dict[str, Any]]
) -> list[Message[NewData]]:
    payload = {"type": "new-data", "id": event_id, "collection": collection, "records": records}
    event = msgspec.convert(payload, NewData)
    return [Message(event, f"test:{collection}:new-data", "1-0", 1)]


def run(
    store: VectorStore, model: VersionedStub, collection: str, event_id: str, records: list[Any]
) -> dict[str, Any]:
    handler = NewDataHandler(Settings(), Once(lambda: store), model)  # type: ignore[arg-type]
    (outcome,) = handler(new_data(collection, event_id, records))
    assert isinstance(outcome, Succeeded), outcome
    return outcome.result


def texts(n: int, **metadata: Any) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"text {i}", "metadata": metadata} for i in range(n)]


def test_rows_record_the_model_version_and_the_text_hash(
    vector_store: VectorStore, collection_name: str
) -> None:
    run(vector_store, VersionedStub(), collection_name, "e1", texts(1))
    row = vector_store.fetch(collection_name, ["r0"])["r0"]
    assert (row.model, row.model_version) == ("stub-model", "v1")
    assert row.text_hash == text_hash("text 0")


def test_an_unchanged_batch_makes_no_model_call_and_no_write(
    vector_store: VectorStore, collection_name: str
) -> None:
    model = VersionedStub()
    first = run(vector_store, model, collection_name, "e1", texts(5, team="a"))
    assert (first["upserted"], first["embedded"], first["unchanged"]) == (5, 5, 0)
    before = vector_store.fetch(collection_name, [f"r{i}" for i in range(5)])
    model.calls.clear()
    again = run(vector_store, model, collection_name, "e2", texts(5, team="a"))
    assert model.calls == []
    assert again["unchanged"] == 5
    assert (again["upserted"], again["embedded"], again["from_cache"]) == (0, 0, 0)
    assert again["metadata_updated"] == 0
    after = vector_store.fetch(collection_name, [f"r{i}" for i in range(5)])
    assert {i: r.updated_at for i, r in after.items()} == {
        i: r.updated_at for i, r in before.items()
    }


def test_a_metadata_only_change_updates_only_the_metadata(
    vector_store: VectorStore, collection_name: str
) -> None:
    model = VersionedStub()
    run(vector_store, model, collection_name, "e1", texts(2, team="a"))
    model.calls.clear()
    records = [*texts(1, team="b"), {"id": "r1", "text": "a new text", "metadata": {"team": "a"}}]
    result = run(vector_store, model, collection_name, "e2", records)
    assert model.calls == [["a new text"]]
    assert (result["metadata_updated"], result["upserted"], result["unchanged"]) == (1, 1, 0)
    rows = vector_store.fetch(collection_name, ["r0", "r1"])
    assert rows["r0"].metadata == {"team": "b"}
    assert rows["r0"].text == "text 0"
    assert rows["r0"].text_hash == text_hash("text 0")
    assert rows["r1"].text_hash == text_hash("a new text")


def test_a_new_model_version_embeds_again(vector_store: VectorStore, collection_name: str) -> None:
    model = VersionedStub()
    run(vector_store, model, collection_name, "e1", texts(3))
    model.version = "v2"
    model.calls.clear()
    result = run(vector_store, model, collection_name, "e2", texts(3))
    assert model.calls == [["text 0", "text 1", "text 2"]]
    assert (result["upserted"], result["unchanged"], result["model_version"]) == (3, 0, "v2")
    assert vector_store.fetch(collection_name, ["r0"])["r0"].model_version == "v2"


def test_rows_from_before_the_fingerprints_are_embedded_again(
    vector_store: VectorStore, collection_name: str, pg_url: str
) -> None:
    model = VersionedStub()
    run(vector_store, model, collection_name, "e1", texts(2))
    table = sql.Identifier(table_name(collection_name))
    with psycopg.connect(pg_url, autocommit=True) as conn:  # as migration 2 leaves old rows
        conn.execute(sql.SQL("UPDATE {} SET model_version = NULL, text_hash = NULL").format(table))
    model.calls.clear()
    result = run(vector_store, model, collection_name, "e2", texts(2))
    assert (result["upserted"], result["unchanged"]) == (2, 0)
    assert vector_store.fetch(collection_name, ["r0"])["r0"].text_hash == text_hash("text 0")


def test_a_record_written_twice_in_one_batch_is_never_skipped(
    vector_store: VectorStore, collection_name: str
) -> None:
    """Stored "old"; the batch writes "new" then "old" again: the stored row must end
    as "old", though it read as unchanged before the batch."""
    model = VersionedStub()
    run(vector_store, model, collection_name, "e1", [{"id": "r", "text": "old"}])
    handler = NewDataHandler(Settings(), Once(lambda: vector_store), model)  # type: ignore[arg-type]
    batch = [
        *new_data(collection_name, "e2", [{"id": "r", "text": "new"}]),
        *new_data(collection_name, "e3", [{"id": "r", "text": "old"}]),
    ]
    outcomes = handler(batch)
    assert [o.result["unchanged"] for o in outcomes if isinstance(o, Succeeded)] == [0, 0]
    assert vector_store.fetch(collection_name, ["r"])["r"].text == "old"


def test_a_metadata_update_loses_to_a_racing_text_change(
    vector_store: VectorStore, collection_name: str, pg_url: str
) -> None:
    """Another worker changed the row between the comparison and the update: the update
    applies only to the row it compared against, so the racing write stands."""
    model = VersionedStub()
    run(vector_store, model, collection_name, "e1", texts(1, team="a"))
    original = vector_store.fingerprints

    def fingerprints_then_race(collection: str, ids: Any) -> Any:
        found = original(collection, ids)
        del vector_store.fingerprints  # the racer reads the real ones
        run(vector_store, model, collection, "racer", [{"id": "r0", "text": "raced"}])
        return found

    vector_store.fingerprints = fingerprints_then_race  # type: ignore[method-assign]
    result = run(vector_store, model, collection_name, "e2", texts(1, team="b"))
    assert result["metadata_updated"] == 1
    row = vector_store.fetch(collection_name, ["r0"])["r0"]
    assert (row.text, row.metadata) == ("raced", {})
