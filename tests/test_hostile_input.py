"""Hostile input: whatever a producer writes to a stream ends processed or dead-lettered
with a reason, never stops a worker, and never writes outside its collection.

Property-based (hypothesis) with bounded examples: the decoder alone gets hundreds of
random payloads; the runtime gets whole batches of them per worker run, against the real
new-data handler and PostgreSQL (a hash stands in for the embedding model).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.new_data import NewDataHandler
from consumers.once import Once
from forge.embedding.model_cache import ModelCache
from forge.embedding.service import EmbeddingService
from forge.errors import InvalidEvent
from forge.events import EVENT_FIELD, Completion, Decoder, ErrorInfo, NewData
from forge.observability.metrics import Metrics
from forge.runtime.context import Context
from forge.runtime.deadletter import build_record, payload_bytes, sniff_event_id
from forge.runtime.entries import Entry
from forge.runtime.handlers import HandlerRegistry, HandlerSpec
from forge.runtime.worker import Worker
from forge.settings import Settings
from forge.vectorstore import InvalidWrite, Row, VectorStore
from forge.vectorstore.copy_binary import MAX_METADATA_DEPTH, encode_chunks
from forge.vectorstore.naming import index_name, table_name, validate_name
from tests.support.redis_helpers import wait_for
from tests.support.workers import completions, dead_letters, make_worker, pending

pytestmark = [
    pytest.mark.postgres,
    # 1e39 is finite as a float64 and overflows the cast to float32 (the store then
    # rejects the infinity): expected here, not a defect of the test.
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]

DIMENSION = 3
# Names that try SQL injection, path traversal, lookalikes and sheer length.
NASTY_NAMES = [
    'x"; DROP TABLE forge_collections; --',
    "x'; DROP TABLE forge_collections; --",
    "coll_x; DELETE FROM forge_processed_events",
    "../../etc/passwd",
    "..",
    "/etc",
    "a/b",
    "a\\b",
    "%2e%2e%2f",
    "$(touch /tmp/pwned)",
    "tickets\n",
    "tick\x00ets",
    "tick ets",
    "t\u0456ckets",  # Cyrillic i
    "\uff54\uff49\uff43\uff4b\uff45\uff54\uff53",  # fullwidth
    "tickets\u200b",  # zero-width space
    "a" * 64,
    "a" * 200,
    "",
    "-leading-dash",
    "9starts_with_digit",
]
# Ids with whitespace and control characters, or too long.
NASTY_IDS = ["", " ", "a b", "tab\there", "x\n", "nul\x00", "del\x7f", "\x1b[31mred", "a" * 257]
_PG_RELATIONS = """
SELECT n.nspname || '.' || c.relname FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
"""

Payload = bytes | dict[bytes, bytes]  # an ``event`` field, or an entry's raw fields


# ------------------------------------------------------------------------ strategies


def json_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    )


def mostly(
    valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """Valid nine times in ten: an event must get past its first bad field for the
    later checks (limits, dimensions, the store) to see the rest."""
    return st.sampled_from([True] * 9 + [False]).flatmap(lambda ok: valid if ok else hostile)


NAMES = (
    st.sampled_from(NASTY_NAMES)
    | st.text(max_size=70)
    # Valid, but upper case and '-': these map to hashed table names.
    | st.from_regex(r"hx[A-Za-z0-9_\-]{0,20}", fullmatch=True)
)
IDS = mostly(
    st.from_regex(r"[A-Za-z0-9._:-]{1,16}", fullmatch=True),
    st.sampled_from(NASTY_IDS) | st.text(max_size=40),
)
FINITE = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
VECTORS: st.SearchStrategy[list[float]] = mostly(
    st.lists(FINITE, min_size=DIMENSION, max_size=DIMENSION),
    st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=2 * DIMENSION)
    | st.just([1e39] * DIMENSION)  # finite as float64, infinite as pgvector's float32
    | st.just([]),
)
TEXTS = mostly(
    st.text(max_size=120),
    st.text(min_size=101, max_size=300) | st.just("nul \x00 inside") | json_values(),
)


def records() -> st.SearchStrategy[dict[str, Any]]:
    metadata = mostly(
        st.dictionaries(st.text(max_size=8), json_values(), max_size=3), json_values()
    )
    anything = st.fixed_dictionaries(
        {"id": IDS},
        optional={
            "text": TEXTS,
            "vector": mostly(VECTORS, json_values()),
            "metadata": metadata,
            "deleted": mostly(st.booleans(), json_values()),
        },
    )
    return st.one_of(
        st.fixed_dictionaries({"id": IDS, "text": TEXTS}, optional={"metadata": metadata}),
        st.fixed_dictionaries({"id": IDS, "vector": VECTORS}, optional={"metadata": metadata}),
        st.fixed_dictionaries({"id": IDS, "deleted": st.just(True)}),
        anything,
    )


def new_data_events(collection: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "type": mostly(st.just("new-data"), json_values()),
            "id": IDS,
            "collection": mostly(st.just(collection), NAMES),
            "records": mostly(st.lists(records(), min_size=1, max_size=5), json_values()),
        },
        optional={
            # Hostile model names have tests of their own (they reach the real loader).
            "model": st.sampled_from([None, Settings().embedding_model]),
            "created_at": mostly(st.datetimes().map(str), json_values()),
            "version": mostly(st.just(1), json_values()),
            "unknown_field": json_values(),
        },
    )


def nested(depth: int, where: str = "metadata", collection: str = "c") -> bytes:
    """A new-data event with ``depth`` nested arrays in a record's metadata (or at the top)."""
    deep = b"[" * depth + b"]" * depth
    if where == "top":
        return deep
    record = {"id": "r", "text": "t", "metadata": {"a": "DEEP"}}
    event = {"type": "new-data", "id": f"deep{depth}", "collection": collection}
    return msgspec.json.encode({**event, "records": [record]}).replace(b'"DEEP"', deep)


def raw_payloads(collection: str = "c") -> st.SearchStrategy[Payload]:
    valid = msgspec.json.encode(
        {"type": "new-data", "id": "v", "collection": "c", "records": [{"id": "r", "text": "t"}]}
    )
    return st.one_of(
        st.binary(max_size=200),
        json_values().map(msgspec.json.encode),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),  # truncated
        st.binary(min_size=1, max_size=4).map(lambda b: valid.replace(b'"t"', b'"' + b + b'"')),
        # Deep, and deep but under the decoder's recursion limit (the store's JSON
        # encoder and PostgreSQL then see it).
        st.sampled_from([nested(n, collection=collection) for n in (10_000, 900, 64, 63)]),
        st.just(nested(10_000, "top")),
        st.sampled_from([b"\xff\xfe\x00", b""]),
        st.just({b"not-event": b"x"}),
    )


def hostile_batches(collection: str) -> st.SearchStrategy[list[Payload]]:
    as_bytes: st.SearchStrategy[Payload] = new_data_events(collection).map(msgspec.json.encode)
    return st.lists(mostly(as_bytes, raw_payloads(collection)), min_size=1, max_size=25)


# --------------------------------------------------------------------- the decoder

DECODER = Decoder(NewData)
FAST = settings(max_examples=300, deadline=None, database=None)


def assert_decodes_or_rejects(payload: bytes) -> None:
    """The decoder's contract: an event whose names and ids are safe, or InvalidEvent
    with a reason; any other exception fails the test."""
    try:
        event = DECODER.decode(payload)
    except InvalidEvent as exc:
        assert str(exc).strip()  # noqa: PT017 - the reason is what is under test
        return
    validate_name(event.collection)
    assert event.records
    for some_id in [event.id, *(r.id for r in event.records)]:
        assert 0 < len(some_id) <= 256
        assert not any(ord(c) <= 0x20 or c == "\x7f" for c in some_id)


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_decode_to_an_event_or_a_clean_rejection(payload: bytes) -> None:
    assert_decodes_or_rejects(payload)
    assert sniff_event_id(payload) is None or isinstance(sniff_event_id(payload), str)


@FAST
@given(json_values())
def test_any_json_value_decodes_or_is_rejected(value: Any) -> None:
    assert_decodes_or_rejects(msgspec.json.encode(value))


@FAST
@given(new_data_events("tickets"))
def test_event_shaped_json_with_hostile_fields_decodes_or_is_rejected(event: Any) -> None:
    assert_decodes_or_rejects(msgspec.json.encode(event))


@FAST
@given(raw_payloads())
def test_dead_letter_records_keep_any_payload_exactly(payload: Payload) -> None:
    """Whatever arrives can be dead-lettered and replayed byte for byte."""
    fields = payload if isinstance(payload, dict) else {EVENT_FIELD: payload}
    entry = Entry("s", "1-0", fields)
    record = build_record(
        entry, ErrorInfo(type="InvalidEvent", message="bad"), group="g", consumer="c"
    )
    if isinstance(payload, bytes):
        assert payload_bytes(record) == payload
    else:
        assert "entry fields: not-event" in record.error.message


@pytest.mark.parametrize("depth", [1_000, 10_000, 100_000])
@pytest.mark.parametrize("where", ["metadata", "top"])
def test_deep_nesting_is_rejected_not_a_crash(depth: int, where: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        DECODER.decode(nested(depth, where))
    message = str(caught.value)
    assert "nested too deeply" in message or "Expected `object`, got `array`" in message
    assert sniff_event_id(nested(depth, where)) is None


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type":"new-data","id":"\xff","collection":"c","records":[{"id":"r","text":"t"}]}',
        b'{"type":"new-data","id":"a","collection":"c","records":[{"id":"r","text":"\xc0\xaf"}]}',
        b'{"type":"new-data","id":"a","collection":"c","records":[{"id":"r","text":"\xed\xa0\x80"}]}',
        b'{"type":"new-data","id":"a","collection":"c","records":[{"id":"r","text":"\\ud800"}]}',
        b'{"\xff":1}',
    ],
    ids=["bad-byte", "overlong", "encoded-surrogate", "escaped-surrogate", "bad-key"],
)
def test_invalid_utf8_is_rejected_with_a_reason(payload: bytes) -> None:
    with pytest.raises(InvalidEvent, match=r"malformed JSON|invalid new-data"):
        DECODER.decode(payload)
    assert sniff_event_id(payload) in (None, "a")


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_nasty_collection_names_are_invalid(name: str) -> None:
    with pytest.raises(InvalidEvent):
        validate_name(name)
    with pytest.raises(InvalidEvent):
        table_name(name)


@settings(max_examples=500, deadline=None, database=None)
@given(st.text(max_size=80) | st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,70}", fullmatch=True))
def test_every_accepted_name_maps_to_a_plain_bounded_identifier(name: str) -> None:
    try:
        table = table_name(name)
    except InvalidEvent:
        return
    assert table.startswith("coll_")
    assert table.replace("_", "").isalnum()
    assert table.isascii()
    assert table == table.lower()
    assert len(index_name(table).encode()) <= 63  # PostgreSQL would truncate beyond


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,62}", fullmatch=True), max_size=8))
def test_distinct_names_never_share_a_table(names: list[str]) -> None:
    unique = set(names)
    assert len({table_name(n) for n in unique}) == len(unique)


# --------------------------------------------------------------- runtime fixtures


class HashEmbedder:
    """Deterministic unit vectors from a hash: the model is not what is under test."""

    name = Settings().embedding_model
    version = "hash-1"
    cache_id = f"{name}@{version}"
    dimension = DIMENSION
    size_bytes = 1

    def encode(self, texts: list[str], batch_size: int) -> npt.NDArray[np.float32]:
        rows = [
            np.frombuffer(hashlib.sha256(t.encode()).digest()[: 4 * DIMENSION], dtype="<u4")
            for t in texts
        ]
        matrix = np.asarray(rows, dtype=np.float32).reshape(len(texts), DIMENSION) + 1.0
        unit: npt.NDArray[np.float32] = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
        return unit


def fake_embedding(settings: Settings) -> EmbeddingService:
    models = ModelCache.from_settings(settings)
    embedder = HashEmbedder()
    models.get_or_load(f"embedder:{settings.embedding_model}", lambda: embedder, lambda e: 1)
    return EmbeddingService(settings, models, None)


def new_data_worker(ctx: Context, store: VectorStore) -> Worker:
    handler = NewDataHandler(ctx.settings, Once(lambda: store), fake_embedding(ctx.settings))
    return make_worker(ctx, handler)


def relations(pg_url: str) -> set[str]:
    """Every table, index, sequence and view outside the system schemas."""
    with psycopg.connect(pg_url) as conn:
        return {str(row[0]) for row in conn.execute(_PG_RELATIONS)}


def collections(pg_url: str) -> dict[str, str | None]:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT name, model FROM forge_collections").fetchall()
    return {str(name): model for name, model in rows}


def publish_all(ctx: Context, payloads: list[Payload]) -> dict[str, Payload]:
    """Publish each payload (a raw entry for field dicts); entry id -> payload."""
    published: dict[str, Payload] = {}
    for payload in payloads:
        fields: dict[Any, Any] = payload if isinstance(payload, dict) else {EVENT_FIELD: payload}
        entry_id: bytes = ctx.redis.xadd(ctx.keys.new_data, fields)  # type: ignore[assignment]
        published[entry_id.decode()] = payload
    return published


def good_event(event_id: str, collection: str) -> bytes:
    vector = [0.5] * DIMENSION
    records = [{"id": f"{event_id}-v", "vector": vector}, {"id": f"{event_id}-t", "text": "ok"}]
    event = {"type": "new-data", "id": event_id, "collection": collection, "records": records}
    return msgspec.json.encode(event)


def run_until_settled(worker: Worker, ctx: Context, expected: int, timeout_s: float = 30) -> None:
    """Run the worker until ``expected`` entries completed; it must still be alive then."""
    worker.ctx.broker.ensure_groups(worker.streams)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(completions(ctx)) >= expected or not thread.is_alive(), timeout_s)
        assert thread.is_alive(), "the worker died on hostile input"
    finally:
        worker.stop()
        thread.join(timeout=60)
    assert not thread.is_alive(), "worker did not stop"


def check_every_entry_settled(ctx: Context, published: Mapping[str, Payload]) -> list[Completion]:
    """One completion per entry; every dead letter has a reason and the exact payload."""
    done = {c.source_entry_id: c for c in completions(ctx)}
    assert set(done) == set(published)
    letters = {r.source_entry_id: r for r in dead_letters(ctx)}
    for entry_id, completion in done.items():
        if completion.status == "succeeded":
            continue
        assert completion.error is not None
        assert completion.error.message
        if completion.status == "dead-lettered":
            record = letters[entry_id]
            assert record.error.message
            payload = published[entry_id]
            if isinstance(payload, bytes):
                assert payload_bytes(record) == payload
    assert pending(ctx) == 0
    return list(done.values())


def named_collections(payloads: Iterable[Payload]) -> set[str]:
    """The collections of the payloads that are valid new-data events."""
    names = set()
    for payload in payloads:
        if isinstance(payload, bytes):
            with contextlib.suppress(InvalidEvent):
                names.add(DECODER.decode(payload).collection)
    return names


def check_nothing_outside(pg_url: str, before: set[str], allowed_collections: set[str]) -> None:
    tables = {table_name(name) for name in allowed_collections}
    new = relations(pg_url) - before
    stray = {r for r in new if not any(r.split(".", 1)[1].startswith(t) for t in tables)}
    assert not stray, f"unexpected relations: {stray}"


@pytest.fixture
def scratch_names(vector_store: VectorStore) -> Iterator[set[str]]:
    """Collections a test lets hostile input create; dropped afterwards."""
    created: set[str] = set()
    yield created
    for name in created:
        vector_store.drop_collection(name)


# ------------------------------------------------------------------- the runtime


@settings(
    max_examples=10,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_random_hostile_batches_end_processed_or_dead_lettered(
    data: st.DataObject, ctx: Context, vector_store: VectorStore, pg_url: str
) -> None:
    collection = f"h_{uuid.uuid4().hex[:10]}"
    hostile = data.draw(hostile_batches(collection), label="hostile batch")
    settings_ = ctx.settings.replace(
        stream_prefix=f"{ctx.settings.stream_prefix}{uuid.uuid4().hex[:6]}:",
        max_payload_bytes=4096,
        max_records_per_event=3,
        max_text_chars=100,
    )
    run_ctx = Context(settings=settings_, redis=ctx.redis, metrics=Metrics(gpu=False))
    before = relations(pg_url)
    known = set(collections(pg_url))
    published = publish_all(run_ctx, [*hostile, good_event("final-good", collection)])
    try:
        run_until_settled(new_data_worker(run_ctx, vector_store), run_ctx, len(published))
        done = check_every_entry_settled(run_ctx, published)
        final = next(c for c in done if c.source_id == "final-good")
        assert final.status == "succeeded", final.error
        # Collections appear only where an event named them (a rejected write may
        # still leave its collection created, empty).
        created = set(collections(pg_url)) - known
        assert created <= named_collections(published.values())
        check_nothing_outside(pg_url, before, created)
        assert vector_store.fetch(collection, ["final-good-v", "final-good-t"]).keys() == {
            "final-good-v",
            "final-good-t",
        }
    finally:
        for name in set(collections(pg_url)) - known:
            vector_store.drop_collection(name)


def curated_cases(collection: str) -> dict[str, tuple[Payload, str]]:
    """Label -> (payload, a fragment its dead-letter reason must contain)."""
    ids = itertools.count()

    def event(records: Any, **fields: Any) -> bytes:
        # Distinct ids: events sharing an id share the first one's fate (idempotency).
        event_id = fields.pop("id", f"e{next(ids)}")
        body = {"type": "new-data", "id": event_id, "collection": collection}
        return msgspec.json.encode({**body, "records": records, **fields})

    def vector(values: str) -> bytes:
        return event([{"id": "r", "vector": [0]}]).replace(b"[0]", values.encode())

    cases: dict[str, tuple[Payload, str]] = {
        "nan": (vector("[NaN, 0, 0]"), "malformed JSON"),
        "infinity": (vector("[Infinity, 0, 0]"), "malformed JSON"),
        "out-of-range": (vector("[1e999, 0, 0]"), "out of range"),
        "float32-overflow": (vector("[1e39, 0, 0]"), "beyond float32 range"),
        "empty-vector": (vector("[]"), "empty vector"),
        "wrong-size": (vector("[0.1, 0.2]"), "dimension"),
        "vector-of-strings": (vector('["a", "b", "c"]'), "Expected `float`"),
        "no-records": (event([]), "length >= 1"),
        "records-not-a-list": (event("yes"), "Expected `array`"),
        "text-not-a-string": (event([{"id": "r", "text": 5}]), "Expected `str | null`"),
        "neither-text-nor-vector": (event([{"id": "r"}]), "neither `text` nor `vector`"),
        "too-many-records": (event([{"id": f"r{i}", "text": "t"} for i in range(10_001)]), "10001"),
        "text-too-long": (event([{"id": "r", "text": "x" * 20_001}]), "over the limit of 20000"),
        "huge-payload": (event([{"id": "r", "text": "x" * 1_100_000}]), "1048576-byte limit"),
        "nul-in-text": (
            event(
                [{"id": "r", "text": "a\x00b"}],
            ),
            "NUL character",
        ),
        "nul-in-metadata": (
            event([{"id": "r", "text": "a", "metadata": {"k": "\x00"}}]),
            "NUL character in metadata",
        ),
        "deep-metadata": (nested(10_000), "nested too deeply"),
        # Decodable, but no reader could load it back (RecursionError on every search).
        "deep-legal-metadata": (nested(900, collection=collection), "deeper than 64 levels"),
        "metadata-at-depth-65": (nested(64, collection=collection), "deeper than 64 levels"),
        "deep-top": (nested(100_000, "top"), "malformed JSON|Expected `object`"),
        "invalid-utf8": (event([{"id": "r", "text": "ok"}]).replace(b"ok", b"\xff\xfe"), "UTF-8"),
        "binary-garbage": (bytes(range(256)), "malformed JSON"),
        "empty-payload": (b"", "malformed JSON"),
        "no-event-field": ({b"payload": b"{}"}, "no 'event' field"),
        "binary-field-name": ({b"\xff\x00": b"\x00"}, "no 'event' field"),
        "training-request": (
            event([], type="training-request", model="m", task="t"),
            "invalid new-data event",
        ),
        "unknown-type": (event([{"id": "r", "text": "t"}], type="drop-tables"), "invalid"),
        "model-injection": (
            event([{"id": "r", "vector": [0.1] * DIMENSION}], model='x"; DROP TABLE t; --'),
            "at `$.model`",
        ),
    }
    for i, bad_id in enumerate(NASTY_IDS):
        cases[f"event-id-{i}"] = (event([{"id": "r", "text": "t"}], id=bad_id), "`$.id`")
        cases[f"record-id-{i}"] = (event([{"id": bad_id, "text": "t"}]), "`$.records[0].id`")
    for i, name in enumerate(NASTY_NAMES):
        body = {"type": "new-data", "id": f"n{i}", "collection": name, "records": [{"id": "r"}]}
        cases[f"name-{i}"] = (msgspec.json.encode(body), "`$.collection`")
    return cases


def test_curated_hostile_events_are_dead_lettered_with_clear_reasons(
    ctx: Context, vector_store: VectorStore, pg_url: str, collection_name: str
) -> None:
    cases = curated_cases(collection_name)
    before = relations(pg_url)
    # The first event fixes the collection's dimension; the last must still be served.
    payloads: list[Payload] = [good_event("first-good", collection_name)]
    payloads += [payload for payload, _ in cases.values()]
    payloads.append(good_event("final-good", collection_name))
    published = publish_all(ctx, payloads)
    run_until_settled(new_data_worker(ctx, vector_store), ctx, len(published))

    done = {c.source_entry_id: c for c in check_every_entry_settled(ctx, published)}
    labels = dict(zip(published, ["first-good", *cases, "final-good"], strict=True))
    reasons = {labels[r.source_entry_id]: r.error.message for r in dead_letters(ctx)}
    for label, (_, fragment) in cases.items():
        assert label in reasons, f"{label}: {done[_entry(labels, label)].status}"
        assert any(f in reasons[label] for f in fragment.split("|")), (label, reasons[label])
    statuses = {labels[entry_id]: c.status for entry_id, c in done.items()}
    assert statuses["first-good"] == statuses["final-good"] == "succeeded"
    assert vector_store.count(collection_name) == 4  # two records per good event
    check_nothing_outside(pg_url, before, {collection_name})
    assert collections(pg_url)[collection_name] == Settings().embedding_model


def _entry(labels: Mapping[str, str], label: str) -> str:
    return next(entry_id for entry_id, name in labels.items() if name == label)


# --------------------------------------------------------------------------- limits


def test_limits_have_safe_defaults_and_come_from_the_environment() -> None:
    defaults = Settings()
    assert defaults.max_payload_bytes == 1_048_576
    assert defaults.max_records_per_event == 10_000
    assert defaults.max_text_chars == 20_000
    env = {
        "FORGE_MAX_PAYLOAD_BYTES": "2KiB",
        "FORGE_MAX_RECORDS_PER_EVENT": "3",
        "FORGE_MAX_TEXT_CHARS": "10",
    }
    configured = Settings.from_env(env)
    assert (configured.max_payload_bytes, configured.max_records_per_event) == (2048, 3)
    assert configured.max_text_chars == 10


def test_each_configured_limit_is_enforced_with_a_clear_reason(
    ctx: Context, vector_store: VectorStore, collection_name: str
) -> None:
    limits = Settings.from_env(
        {
            "FORGE_MAX_PAYLOAD_BYTES": "2KiB",
            "FORGE_MAX_RECORDS_PER_EVENT": "3",
            "FORGE_MAX_TEXT_CHARS": "10",
        }
    )
    ctx = replace(
        ctx,
        settings=ctx.settings.replace(
            max_payload_bytes=limits.max_payload_bytes,
            max_records_per_event=limits.max_records_per_event,
            max_text_chars=limits.max_text_chars,
        ),
    )

    def event(event_id: str, records: list[dict[str, Any]], pad: int = 0) -> bytes:
        body = {"type": "new-data", "id": event_id, "collection": collection_name}
        return msgspec.json.encode({**body, "records": records, "pad": "p" * pad})

    at_limit = event("at-limit", [{"id": f"r{i}", "text": "x" * 10} for i in range(3)])
    big = event("big", [{"id": "r", "text": "t"}], pad=2048)
    exact = event("exact", [{"id": "e", "text": "t"}])
    exact = event("exact", [{"id": "e", "text": "t"}], pad=2048 - len(exact))
    assert len(exact) == 2048
    assert len(big) > 2048
    payloads = {
        "at-limit": at_limit,
        "exact-size": exact,
        "too-big": big,
        "too-many": event("many", [{"id": f"r{i}", "text": "t"} for i in range(4)]),
        "too-long": event("long", [{"id": "r", "text": "x" * 11}]),
    }
    published = publish_all(ctx, list(payloads.values()))
    run_until_settled(new_data_worker(ctx, vector_store), ctx, len(published))
    check_every_entry_settled(ctx, published)
    labels = dict(zip(published, payloads, strict=True))
    status = {labels[c.source_entry_id]: c.status for c in completions(ctx)}
    reasons = {labels[r.source_entry_id]: r.error.message for r in dead_letters(ctx)}
    assert status["at-limit"] == status["exact-size"] == "succeeded"
    assert reasons == {
        "too-big": f"payload is {len(big)} bytes, over the 2048-byte limit",
        "too-many": "4 records, over the limit of 3",
        "too-long": "record 'r': text of 11 characters, over the limit of 10",
    }


# --------------------------------------------------------------- names and stores


def deep_metadata(depth: int) -> dict[str, Any]:
    """Metadata whose lists and objects nest ``depth`` levels (the object counts)."""
    value: Any = []
    for _ in range(depth - 2):
        value = [value]
    return {"a": value}


def test_metadata_depth_is_bounded_at_the_store() -> None:
    def encode(metadata: dict[str, Any]) -> bytes:
        row = Row("r", np.ones(DIMENSION, dtype=np.float32), "e", None, metadata, None)
        return b"".join(encode_chunks([row], np.ones((1, DIMENSION), dtype=np.float32)))

    assert encode(deep_metadata(MAX_METADATA_DEPTH))
    assert encode({"text": "[[[[" * 100})  # brackets inside strings are not nesting
    with pytest.raises(InvalidWrite, match=f"deeper than {MAX_METADATA_DEPTH} levels"):
        encode(deep_metadata(MAX_METADATA_DEPTH + 1))


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_the_store_refuses_nasty_names_and_creates_nothing(
    name: str, vector_store: VectorStore, pg_url: str
) -> None:
    before = relations(pg_url)
    row = Row("r", np.ones(DIMENSION, dtype=np.float32), "e", None, {}, None)
    calls: list[Callable[[], object]] = [
        lambda: vector_store.collection(name),
        lambda: vector_store.ensure_collection(name, DIMENSION),
        lambda: vector_store.write_batch(name, [row], ["e"], "scope"),
        lambda: vector_store.count(name),
        lambda: vector_store.search(name, np.ones(DIMENSION, dtype=np.float32), 3),
        lambda: vector_store.fetch(name, ["r"]),
        lambda: vector_store.drop_collection(name),
    ]
    for call in calls:
        with pytest.raises(InvalidEvent):
            call()
    assert relations(pg_url) == before


def test_hostile_model_names_are_rejected_by_the_contract(
    ctx: Context, vector_store: VectorStore, pg_url: str, scratch_names: set[str]
) -> None:
    """An event may only name a model id, never a path or SQL: such events are
    dead-lettered at decode, and no collection or table is created for them."""
    before = relations(pg_url)
    hostile = {
        f"m{i}_{uuid.uuid4().hex[:8]}": model
        for i, model in enumerate(['x"; DROP TABLE forge_collections; --', "../../etc", "a" * 300])
    }
    scratch_names.update(hostile)
    payloads: list[Payload] = []
    for name, model in hostile.items():
        record = {"id": "r", "vector": [0.1] * DIMENSION}
        body = {"type": "new-data", "id": name, "collection": name, "model": model}
        payloads.append(msgspec.json.encode({**body, "records": [record]}))
    published = publish_all(ctx, payloads)
    run_until_settled(new_data_worker(ctx, vector_store), ctx, len(published))
    check_every_entry_settled(ctx, published)
    stored = collections(pg_url)
    assert not set(hostile) & set(stored)
    reasons = [r.error.message for r in dead_letters(ctx)]
    assert len(reasons) == len(hostile)
    assert all("at `$.model`" in reason for reason in reasons)
    check_nothing_outside(pg_url, before, set())


def test_hostile_model_names_with_the_real_loader_touch_no_outside_files(
    ctx: Context, vector_store: VectorStore, tmp_path: Path, scratch_names: set[str]
) -> None:
    """Text for a new collection whose event names a path or nonsense as its model: the
    real loader fails, the event is dead-lettered with the loader's reason, and no file
    appears outside the model folder."""
    ctx = replace(ctx, settings=ctx.settings.replace(max_deliveries=1, retry_attempts=1))
    outside = f"forge-hostile-{uuid.uuid4().hex[:8]}"
    models = [f"../../{outside}", "/etc", 'x"; DROP TABLE t; --', "a" * 200, "\x1b[31m"]
    names = [f"l{i}_{uuid.uuid4().hex[:8]}" for i in range(len(models))]
    scratch_names.update(names)
    payloads: list[Payload] = []
    for name, model in zip(names, models, strict=True):
        body = {"type": "new-data", "id": name, "collection": name, "model": model}
        payloads.append(msgspec.json.encode({**body, "records": [{"id": "r", "text": "hi"}]}))
    published = publish_all(ctx, [*payloads, good_event("after", names[0] + "_ok")])
    scratch_names.add(names[0] + "_ok")
    before = _files(tmp_path)
    # The hash model serves the default name only: every other name reaches the real
    # sentence-transformers loader.
    handler = NewDataHandler(ctx.settings, Once(lambda: vector_store), fake_embedding(ctx.settings))
    registry = HandlerRegistry()
    registry.register(HandlerSpec("new-data", NewData, handler))
    run_until_settled(Worker(ctx, registry), ctx, len(published), timeout_s=60)
    check_every_entry_settled(ctx, published)
    statuses = {c.source_id: c.status for c in completions(ctx)}
    assert statuses == {**dict.fromkeys(names, "dead-lettered"), "after": "succeeded"}
    models_dir = ctx.settings.models_path.resolve()
    new_files = _files(tmp_path) - before
    assert all(models_dir in f.parents for f in new_files), new_files
    for base in (Path.cwd(), models_dir, models_dir / "sentence-transformers"):
        assert not (base / f"../../{outside}").resolve().exists()


def _files(root: Path) -> set[Path]:
    return {p.resolve() for p in root.rglob("*") if p.is_file()}


def test_cli_search_refuses_nasty_names_in_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    pg_url: str,
    tmp_path: Path,
) -> None:
    from forge.cli.main import main

    before = relations(pg_url)
    monkeypatch.setenv("POSTGRES_URL", pg_url)
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    for name in NASTY_NAMES[:6]:
        code = main(["search", name, "hello"])
        _, err = capsys.readouterr()
        assert code == 1
        assert err.startswith("forge: error: invalid collection name")
        assert err.count("\n") == 1
    assert relations(pg_url) == before
