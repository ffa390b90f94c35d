"""Reaching the servers Forge uses: ``forge env`` and the Redis line of ``forge status``."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from forge.cli import cmd_streams
from forge.cli.runtime import redis_location
from forge.runtime.context import Context
from forge.servers.embedded_postgres import start_embedded_postgres
from forge.servers.embedded_redis import EmbeddedRedis
from forge.settings import Settings
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.redis_helpers import TEST_REDIS_URL


@pytest.fixture
def no_servers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A FORGE_HOME with no server configured and none running; returns it."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("POSTGRES_URL", raising=False)
    monkeypatch.setenv("FORGE_HOME", str(tmp_path))
    return tmp_path


def test_status_names_the_redis_it_reads_without_secrets(
    capsys: pytest.CaptureFixture[str], cli_env: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run_cli(capsys, "status")
    assert code == 0
    assert out.splitlines()[0] == f"redis: {redis_location(TEST_REDIS_URL)} (REDIS_URL)"

    real_open_redis = cmd_streams.open_redis

    @contextmanager
    def with_password(settings: Settings) -> Iterator[tuple[object, Settings]]:
        with real_open_redis(settings) as (client, used):
            yield client, used.replace(redis_url="rediss://app:hunter2@db.example:6380/2")

    monkeypatch.setattr(cmd_streams, "open_redis", with_password)
    code, out, _ = run_cli(capsys, "status")
    assert out.splitlines()[0] == "redis: db.example:6380 db 2, TLS (REDIS_URL)"
    code, out, _ = run_cli(capsys, "status", "--json")
    assert json.loads(out)["redis"] == "db.example:6380 db 2, TLS"
    assert "hunter2" not in out


@pytest.mark.parametrize(
    ("url", "location"),
    [
        ("redis://127.0.0.1:6379/0", "127.0.0.1:6379 db 0"),
        ("redis://localhost", "localhost:6379 db 0"),
        ("redis://:pw@[::1]:7000/3", "[::1]:7000 db 3"),
        ("redis://h/0?db=5&password=pw", "h:6379 db 5"),
        ("rediss://u:pw@h:6390/0?ssl_ca_certs=/etc/ca.pem", "h:6390 db 0, TLS"),
        ("unix:///run/a%20b/redis.sock?db=1", "/run/a b/redis.sock db 1"),
        ("unix:///tmp/redis.sock", "/tmp/redis.sock db 0"),
    ],
)
def test_redis_location_shows_where_without_secrets(url: str, location: str) -> None:
    assert redis_location(url) == location


def test_status_tells_whether_a_worker_serves_the_embedded_redis(
    capsys: pytest.CaptureFixture[str], no_servers: Path
) -> None:
    code, out, _ = run_cli(capsys, "status")
    assert code == 0
    assert "(embedded, started for this command: no worker is running)" in out.splitlines()[0]
    with EmbeddedRedis(no_servers / "data" / "redis") as server:  # as a worker holds it
        code, out, _ = run_cli(capsys, "status")
        expected = f"redis: {server.socket_path} db 0 (embedded, served by a running worker)"
        assert out.splitlines()[0] == expected


def test_env_prints_the_embedded_redis_for_a_shell_and_redis_cli(
    capsys: pytest.CaptureFixture[str], no_servers: Path
) -> None:
    code, _, err = run_cli(capsys, "env")
    assert_one_line_error(code, err, "no embedded server is running", "forge worker")
    with EmbeddedRedis(no_servers / "data" / "redis") as server:
        code, out, _ = run_cli(capsys, "env")
        assert code == 0
        socket = str(server.socket_path)
        assert out == f"REDIS_URL={shlex.quote(server.url)}\nREDIS_SOCKET={shlex.quote(socket)}\n"
        shell = subprocess.run(
            ["bash", "-c", 'eval "$1" && printf "%s|%s" "$REDIS_URL" "$REDIS_SOCKET"', "_", out],
            capture_output=True,
            text=True,
            check=True,
        )
        assert shell.stdout == f"{server.url}|{socket}"
        assert run_cli(capsys, "env", "--redis-url")[1] == f"{server.url}\n"
        assert run_cli(capsys, "env", "--redis-socket")[1] == f"{socket}\n"
        if shutil.which("redis-cli"):
            pong = subprocess.run(
                ["redis-cli", "-s", socket, "PING"], capture_output=True, check=True
            )
            assert pong.stdout.strip() == b"PONG"
        code, _, err = run_cli(capsys, "env", "--postgres-url")
        assert_one_line_error(code, err, "no embedded PostgreSQL is running")
    code, _, err = run_cli(capsys, "env", "--redis-url")
    assert_one_line_error(code, err, "no embedded Redis is running")


def test_env_prints_configured_urls(
    capsys: pytest.CaptureFixture[str], no_servers: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    monkeypatch.setenv("POSTGRES_URL", "postgresql://forge@db/forge")
    code, out, _ = run_cli(capsys, "env")
    assert code == 0
    assert out == f"REDIS_URL={TEST_REDIS_URL}\nPOSTGRES_URL=postgresql://forge@db/forge\n"
    code, _, err = run_cli(capsys, "env", "--redis-socket")
    assert_one_line_error(code, err, "not reached through a unix socket")
    code, _, err = run_cli(capsys, "env", "--redis-url", "--postgres-url")
    assert code == 2
    assert_one_line_error(code, err, "not allowed with")


@pytest.mark.postgres
def test_env_finds_the_embedded_postgres_a_worker_runs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, pg_tmp_path: Path
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("POSTGRES_URL", raising=False)
    monkeypatch.setenv("FORGE_HOME", str(pg_tmp_path))
    handle = start_embedded_postgres(pg_tmp_path / "data" / "postgres")
    try:
        code, out, _ = run_cli(capsys, "env")
        assert code == 0
        assert out == f"POSTGRES_URL={shlex.quote(handle.url)}\n"
        assert run_cli(capsys, "env", "--postgres-url")[1] == f"{handle.url}\n"
    finally:
        handle.stop()
    code, _, err = run_cli(capsys, "env", "--postgres-url")
    assert_one_line_error(code, err, "no embedded PostgreSQL is running")
