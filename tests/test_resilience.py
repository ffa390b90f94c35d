"""Redis going away and coming back, embedded defaults, bounded output streams."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from forge.events import NewData
from forge.observability.metrics import Metrics
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, HandlerSpec, Message
from forge.runtime.worker import Worker
from forge.servers.connect import connect_redis
from forge.servers.embedded_redis import EmbeddedRedis
from forge.settings import Settings
from tests.support.cli import run_forge
from tests.support.events import new_data, publish
from tests.support.metrics import sample
from tests.support.redis_helpers import running, wait_for
from tests.support.workers import completions

REPO = Path(__file__).resolve().parents[1]


def test_output_streams_are_trimmed(ctx: Context) -> None:
    ctx.broker.maxlen = 10
    for i in range(1000):
        ctx.publish(ctx.keys.completions, _completion(ctx, i))
    # Approximate trimming works in whole radix-tree nodes (100 entries by default).
    assert ctx.redis.xlen(ctx.keys.completions) <= 200


def _completion(ctx: Context, i: int):  # type: ignore[no-untyped-def]
    from forge.events import Completion

    return Completion(
        id=f"c{i}",
        source_id=f"e{i}",
        source_stream=ctx.keys.new_data,
        source_entry_id="0-1",
        status="succeeded",
        worker="w",
    )


def test_worker_rides_out_a_redis_restart_and_loses_nothing(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    settings = Settings(
        redis_url=url,
        home_dir=tmp_path,
        read_block_s=0.05,
        retry_backoff_initial_s=0.01,
        retry_backoff_max_s=0.05,
    )
    client = connect_redis(url)
    seen: list[str] = []

    def handle(messages: Sequence[Message[NewData]]) -> None:
        seen.extend(m.event.id for m in messages)

    ctx = Context(settings=settings, redis=client, metrics=Metrics(gpu=False))
    registry = HandlerRegistry()
    registry.register(HandlerSpec("new-data", NewData, handle))
    worker = Worker(ctx, registry)
    try:
        with running(worker):
            for i in range(5):
                publish(client, ctx.keys.new_data, new_data(f"a{i}"))
            wait_for(lambda: len(completions(ctx)) == 5)
            server.stop()  # SIGTERM: the AOF is flushed
            wait_for(
                lambda: (
                    sample(ctx.metrics, "forge_infrastructure_errors_total", component="redis") > 0
                )
            )
            server.start()
            for i in range(5):
                _publish_retrying(client, ctx.keys.new_data, new_data(f"b{i}"))
            wait_for(lambda: len(completions(ctx)) == 10, timeout_s=30)
    finally:
        client.close()
        server.stop()
    assert sorted(seen) == sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)])


def _publish_retrying(client: redis.Redis, stream: str, event: dict[str, object]) -> None:
    wait_for(lambda: _try_publish(client, stream, event), timeout_s=10)


def _try_publish(client: redis.Redis, stream: str, event: dict[str, object]) -> bool:
    try:
        publish(client, stream, event)
    except redis.ConnectionError:
        return False
    return True


@pytest.mark.parametrize("command", [["status", "--json"]])
def test_cli_uses_the_embedded_redis_when_redis_url_is_unset(
    tmp_path: Path, command: list[str]
) -> None:
    env = {"FORGE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def forge(*argv: str) -> subprocess.CompletedProcess[str]:
        return run_forge(env, *argv, timeout_s=60)

    published = forge("publish", "new-data", json.dumps(new_data("e1")))
    assert published.returncode == 0, published.stderr
    status = forge(*command)
    assert status.returncode == 0, status.stderr
    snap = json.loads(status.stdout)
    lengths = {s["stream"]: s["length"] for s in snap["streams"]}
    assert lengths["forge:new-data"] == 1  # persisted by the embedded server's AOF
    # Redis 7 writes its AOF as parts in a folder, appendonlydir/.
    assert (tmp_path / "data" / "redis" / "forge.aof").exists() or any(
        (tmp_path / "data" / "redis").rglob("*.aof*")
    )


def test_wrong_redis_credentials_fail_fast_instead_of_retrying_forever(ctx: Context) -> None:
    bad = connect_redis("redis://nobody:not-the-password@127.0.0.1:6379/0")
    broken = Context(settings=ctx.settings, redis=bad, metrics=Metrics(gpu=False))
    registry = HandlerRegistry()
    registry.register(HandlerSpec("new-data", NewData, lambda messages: None))
    with pytest.raises(redis.AuthenticationError):
        Worker(broken, registry).run()


def test_wrong_redis_credentials_are_one_line_without_the_password() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "forge.cli.main", "status"],
        env={"REDIS_URL": "redis://nobody:s3cret-pw@127.0.0.1:6379/0", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("forge: error: Redis refused the credentials")
    assert "s3cret-pw" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_a_worker_waits_for_postgresql_on_its_first_connection(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outage at a worker's first connection must not fail (and so dead-letter)
    events within seconds: opening the store waits, up to FORGE_DB_CONNECT_WAIT_S."""
    import psycopg

    import consumers
    from forge.vectorstore import VectorStore

    attempts: list[int] = []

    def flaky_open(self: VectorStore, *, timeout_s: float = 30.0) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr(VectorStore, "open", flaky_open)
    monkeypatch.setattr(VectorStore, "close", lambda self: None)
    ctx = replace(
        ctx,
        settings=ctx.settings.replace(
            postgres_url="postgresql://forge@127.0.0.1:1/forge", db_connect_wait_s=30.0
        ),
    )
    assert isinstance(consumers.open_store(ctx), VectorStore)
    assert len(attempts) == 3

    attempts.clear()
    ctx = replace(ctx, settings=ctx.settings.replace(db_connect_wait_s=0.0))
    with pytest.raises(psycopg.OperationalError):
        consumers.open_store(ctx)
