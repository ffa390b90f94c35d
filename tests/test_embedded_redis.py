"""The embedded redis-server, run for real: start, persist, stop, and die with Forge."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest
import redis

import forge
from forge.errors import EmbeddedServerError
from forge.servers import embedded_redis, redis_binary
from forge.servers.embedded_redis import EmbeddedRedis, resolve_redis_url
from forge.settings import Settings

REPO_ROOT = Path(forge.__file__).resolve().parent.parent

# Starts an embedded server on argv[1], writes a key, prints the server's pid, then
# behaves as argv[2] says: "hang" (to be SIGKILLed), "orphan" (vanish without cleanup,
# as a killed Forge does where there is no parent-death signal) or "exit" (a normal
# exit that only the atexit hook cleans up after).
CHILD_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import redis
    from forge.servers import embedded_redis, redis_binary

    data_dir, mode = Path(sys.argv[1]), sys.argv[2]
    if mode != "hang":
        embedded_redis.die_with_parent_preexec = lambda sig=None: None
    server = embedded_redis.EmbeddedRedis(data_dir)
    redis.Redis.from_url(server.start()).set("survivor", mode)
    print("PID", server.pid, flush=True)
    if mode == "hang":
        time.sleep(60)
    elif mode == "orphan":
        os._exit(0)
    """
)


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its reaper counts as exited)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return state == "Z"


def _wait_for(condition: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _spawn_child(data_dir: Path, mode: str) -> tuple[subprocess.Popen[str], int]:
    """Run ``CHILD_SCRIPT`` and return it with the pid of the server it started."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, str(data_dir), mode],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    for line in child.stdout:  # structlog may print before our line
        if line.startswith("PID "):
            return child, int(line.split()[1])
    child.wait(60)
    pytest.fail(f"child exited with {child.returncode} before starting Redis")


def _fake_server(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-redis-server"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def aof_files(data_dir: Path) -> list[Path]:
    """The append-only file: one file before Redis 7, a folder of parts from 7 on."""
    parts = sorted((data_dir / "appendonlydir").glob("forge.aof*"))
    return [path for path in [data_dir / "forge.aof", *parts] if path.exists()]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis") as running:
        yield running


def test_start_answers_ping_on_private_socket(server: EmbeddedRedis) -> None:
    assert server.url == f"unix://{server.socket_path}?db=0"
    assert redis.Redis.from_url(server.url).ping()
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o700
    assert server.start() == server.url  # already running: same server


def test_data_persists_across_restart(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis") as first:
        redis.Redis.from_url(first.url).set("k", "v")
    assert sum(part.stat().st_size for part in aof_files(tmp_path / "redis")) > 0
    with EmbeddedRedis(tmp_path / "redis") as second:
        assert redis.Redis.from_url(second.url).get("k") == b"v"


def test_stop_terminates_process(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    pid = server.pid
    assert pid is not None
    server.stop()
    assert _gone(pid)
    assert not server.running
    assert not server.socket_path.exists()
    server.stop()  # idempotent
    with pytest.raises(EmbeddedServerError, match="not started"):
        _ = server.url


def test_second_forge_on_same_data_dir_is_refused(server: EmbeddedRedis) -> None:
    with pytest.raises(EmbeddedServerError, match="in use by another Forge process"):
        EmbeddedRedis(server.data_dir).start()
    assert redis.Redis.from_url(server.url).ping()


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_when_forge_is_killed(tmp_path: Path) -> None:
    child, server_pid = _spawn_child(tmp_path / "redis", "hang")
    child.send_signal(signal.SIGKILL)
    child.wait(60)
    assert _wait_for(lambda: _gone(server_pid)), "redis-server outlived its killed parent"
    # The parent-death signal is SIGTERM, so Redis flushed its AOF on the way out.
    with EmbeddedRedis(tmp_path / "redis") as again:
        assert redis.Redis.from_url(again.url).get("survivor") == b"hang"


def test_atexit_stops_server(tmp_path: Path) -> None:
    child, server_pid = _spawn_child(tmp_path / "redis", "exit")
    assert child.wait(60) == 0
    assert _wait_for(lambda: _gone(server_pid))


def test_leftover_server_from_dead_forge_is_replaced(tmp_path: Path) -> None:
    child, old_pid = _spawn_child(tmp_path / "redis", "orphan")
    child.wait(60)
    assert not _gone(old_pid), "the orphan scenario needs a surviving server"
    try:
        with EmbeddedRedis(tmp_path / "redis") as server:
            assert _gone(old_pid)
            assert server.pid != old_pid
            assert redis.Redis.from_url(server.url).get("survivor") == b"orphan"
    finally:
        if not _gone(old_pid):
            os.kill(old_pid, signal.SIGKILL)


def test_long_data_dir_gets_short_socket(tmp_path: Path) -> None:
    data_dir = tmp_path / ("d" * 120)
    with EmbeddedRedis(data_dir) as server:
        assert len(os.fsencode(server.socket_path)) <= 100
        assert redis.Redis.from_url(server.url).ping()
        socket_dir = server.socket_path.parent
    assert not socket_dir.exists()
    assert aof_files(data_dir)


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_binary, "_bundled_redis_server", lambda: None)
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    with pytest.raises(EmbeddedServerError, match="no redis-server binary found"):
        EmbeddedRedis(tmp_path / "redis").start()


def test_unrunnable_binary_is_a_clear_error(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", executable=tmp_path / "nope")
    with pytest.raises(EmbeddedServerError, match="cannot run"):
        server.start()


def test_crash_on_start_quotes_the_log(tmp_path: Path) -> None:
    fake = _fake_server(tmp_path, 'echo "FATAL CONFIG FILE ERROR: boom" >&2; exit 3')
    with pytest.raises(EmbeddedServerError, match="status 3") as caught:
        EmbeddedRedis(tmp_path / "redis", executable=fake).start()
    assert "FATAL CONFIG FILE ERROR: boom" in str(caught.value)
    # The failed start released the data folder.
    with EmbeddedRedis(tmp_path / "redis") as server:
        assert redis.Redis.from_url(server.url).ping()


class _ClockHeldUntil:
    """Stands in for ``embedded_redis``'s ``time`` module: its clock stands still until
    ``ready()``, then leaps an hour at every read. A start timeout then expires once the
    test's condition holds, not after a span a loaded machine might need just to run
    the server's first line."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        self._ready = ready
        self._now_s = 0.0

    def monotonic(self) -> float:
        if self._ready():
            self._now_s += 3600.0
        return self._now_s

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)


def test_start_timeout_kills_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pid_file = tmp_path / "fake.pid"
    # The log line first, then the pid, moved into place whole once written.
    body = (
        f'echo stuck; echo $$ > "{pid_file}.tmp"; mv "{pid_file}.tmp" "{pid_file}"; exec sleep 30'
    )
    fake = _fake_server(tmp_path, body)
    monkeypatch.setattr(embedded_redis, "time", _ClockHeldUntil(pid_file.exists))
    with pytest.raises(EmbeddedServerError, match="did not answer PING") as caught:
        EmbeddedRedis(tmp_path / "redis", executable=fake).start(timeout_s=0.5)
    assert "stuck" in str(caught.value)
    assert _gone(int(pid_file.read_text()))


def test_resolve_redis_url_uses_configured_url(tmp_path: Path) -> None:
    settings = Settings(redis_url="redis://example:6379/0", home_dir=tmp_path)
    assert resolve_redis_url(settings) == ("redis://example:6379/0", None)
    assert not (tmp_path / "data").exists()


def test_resolve_redis_url_starts_embedded_server(tmp_path: Path) -> None:
    url, server = resolve_redis_url(Settings(home_dir=tmp_path))
    assert server is not None
    try:
        assert server.data_dir == tmp_path / "data" / "redis"
        assert redis.Redis.from_url(url).ping()
    finally:
        server.stop()


# Holds an embedded server on FORGE_HOME=argv[1] in the role argv[2], as `forge publish`
# ("command") or `forge worker` ("worker") would, writes a key, prints the server's pid,
# and keeps it until its stdin closes.
HOLDER_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import redis
    from forge.servers.embedded_redis import resolve_redis_url
    from forge.settings import Settings

    url, server = resolve_redis_url(Settings(home_dir=Path(sys.argv[1])), role=sys.argv[2])
    redis.Redis.from_url(url).set("written_by", sys.argv[2])
    print("PID", server.pid, flush=True)
    sys.stdin.read()
    server.stop()
    """
)


@pytest.fixture
def spawn_holder() -> Iterator[Callable[[Path, str], tuple[subprocess.Popen[str], int]]]:
    children: list[subprocess.Popen[str]] = []

    def spawn(home: Path, role: str) -> tuple[subprocess.Popen[str], int]:
        child = subprocess.Popen(
            [sys.executable, "-c", HOLDER_SCRIPT, str(home), role],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        children.append(child)
        assert child.stdout is not None
        for line in child.stdout:  # structlog may print before our line
            if line.startswith("PID "):
                return child, int(line.split()[1])
        pytest.fail(f"holder exited with {child.wait(60)} before starting Redis")

    yield spawn
    for child in children:
        if child.stdin is not None:
            with contextlib.suppress(OSError):
                child.stdin.close()
        child.wait(60)


@pytest.mark.parametrize(
    ("owner_role", "joiner_role"),
    [("worker", "worker"), ("worker", "command"), ("command", "command")],
)
def test_resolve_joins_a_server_its_role_may_share(
    tmp_path: Path,
    spawn_holder: Callable[[Path, str], tuple[subprocess.Popen[str], int]],
    owner_role: str,
    joiner_role: Literal["worker", "command"],
) -> None:
    _, server_pid = spawn_holder(tmp_path, owner_role)
    url, handle = resolve_redis_url(Settings(home_dir=tmp_path), role=joiner_role)
    assert handle is None
    client = redis.Redis.from_url(url)
    assert client.info("server")["process_id"] == server_pid
    assert client.get("written_by") == owner_role.encode()


def test_worker_waits_out_a_commands_server_then_starts_its_own(
    tmp_path: Path,
    spawn_holder: Callable[[Path, str], tuple[subprocess.Popen[str], int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    command, command_server_pid = spawn_holder(tmp_path, "command")
    told_to_exit = command.stdin
    assert told_to_exit is not None
    settings = Settings(home_dir=tmp_path)
    # While the command holds its server, a worker refuses to join it.
    with pytest.raises(EmbeddedServerError, match="still served by a Forge command"):
        resolve_redis_url(settings, role="worker", join_wait_s=0.2)

    real_owner_role = EmbeddedRedis.owner_role

    def command_exits_once_the_worker_waits(self: EmbeddedRedis) -> str | None:
        role = real_owner_role(self)
        if role == "command" and not told_to_exit.closed:
            told_to_exit.close()
        return role

    monkeypatch.setattr(EmbeddedRedis, "owner_role", command_exits_once_the_worker_waits)
    url, handle = resolve_redis_url(settings, role="worker", join_wait_s=60.0)
    assert handle is not None
    try:
        assert told_to_exit.closed  # the worker did find the command's server and wait
        assert _gone(command_server_pid)
        client = redis.Redis.from_url(url)
        assert client.info("server")["process_id"] == handle.pid != command_server_pid
        assert client.get("written_by") == b"command"  # the AOF kept the command's write
    finally:
        handle.stop()
