from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from forge.errors import EmbeddedServerError
from forge.runtime.context import Context
from forge.servers import embedded_postgres
from forge.servers.embedded_postgres import (
    SYSTEM_USER,
    resolve_postgres_url,
    start_embedded_postgres,
)
from forge.servers.pg_watchdog import start_watchdog
from forge.settings import Settings
from tests.support.events import publish
from tests.support.redis_helpers import TEST_REDIS_URL, wait_for
from tests.support.workers import completions

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[1]

# Starts the embedded server, then dies without any cleanup (like an OOM kill), and
# its watchdog with it, as if one kill had taken both: the server keeps running.
_KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
from forge.servers import embedded_postgres
pgdata = Path(sys.argv[1]).resolve()
handle = embedded_postgres.start_embedded_postgres(pgdata)
watchdog = embedded_postgres._watchdogs[pgdata]
watchdog.kill()
watchdog.wait()
print(f"CHILD-PID {os.getpid()}", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

# Starts (or joins) the embedded server, says so, and holds it until stdin closes.
_HOLDER = """
import os, sys
from pathlib import Path
from forge.servers import embedded_postgres
pgdata = Path(sys.argv[1]).resolve()
handle = embedded_postgres.start_embedded_postgres(pgdata)
watchdog = embedded_postgres._watchdogs[pgdata]
print(f"HOLDING {os.getpid()} {watchdog.pid} {handle.url}", flush=True)
sys.stdin.read()
handle.stop()
"""
_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _server_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def _handle_pids(pgdata: Path) -> list[int]:
    """The wheel's list of holders, read under the lock its writers hold: the wheel
    rewrites the file in place."""
    with embedded_postgres._pgserver().PostgresServer._lock:
        return [int(pid) for pid in json.loads((pgdata / ".handle_pids.json").read_text())]


def _postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its reaper counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def _eventually(condition: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    """Poll for ``condition``; the bound only decides how long a failure takes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


class Holder:
    """A process that holds the embedded server in ``pgdata`` (``_HOLDER``)."""

    def __init__(self, pgdata: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(pgdata)],
            cwd=ROOT,
            env=_ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # structlog prints before our line
            if line.startswith("HOLDING "):
                pid, watchdog, self.url = line.split()[1:]
                self.pid, self.watchdog_pid = int(pid), int(watchdog)
                return
        pytest.fail(f"holder exited with {self.proc.wait(60)} before holding the server")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(60)

    def release(self) -> int:
        """Let go normally; the exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(60)


@pytest.fixture
def holders() -> Iterator[Callable[[Path], Holder]]:
    started: list[Holder] = []

    def start(pgdata: Path) -> Holder:
        started.append(Holder(pgdata))
        return started[-1]

    yield start
    for holder in started:  # SIGKILL: their watchdogs stop the server
        if holder.proc.poll() is None:
            holder.kill()
    for holder in started:
        _eventually(functools.partial(_gone, holder.watchdog_pid))


def test_configured_url_starts_nothing() -> None:
    url, handle = resolve_postgres_url(Settings(postgres_url="postgresql://db.example/forge"))
    assert (url, handle) == ("postgresql://db.example/forge", None)


def test_lifecycle_with_pgvector_and_recovery_after_sigkill(pg_tmp_path: Path) -> None:
    # Not ``tmp_path``: a pytest run started meanwhile would lock the server out of it.
    settings = Settings(home_dir=pg_tmp_path / "home")
    pgdata = settings.data_dir / "postgres"

    child = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, str(pgdata)],
        check=False,
        cwd=ROOT,
        env=_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -9, child.stderr
    dead_pid = int(child.stdout.split("CHILD-PID ")[1].split()[0])
    assert _handle_pids(pgdata) == [dead_pid]  # the stale handle the kill left behind

    url, handle = resolve_postgres_url(settings)
    assert handle is not None
    try:
        assert _handle_pids(pgdata) == [os.getpid()]
        assert url.startswith("postgresql://")
        assert "host=/" in url  # a Unix socket folder, no TCP
        with psycopg.connect(url) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            distance = conn.execute("SELECT '[1,0]'::vector <=> '[0,1]'::vector").fetchone()
            assert distance == (1.0,)
        if os.geteuid() == 0:
            import pwd

            assert pgdata.stat().st_uid == pwd.getpwnam(SYSTEM_USER).pw_uid

        # A second handle in this process shares the server; only the last stop counts.
        second = start_embedded_postgres(pgdata)
        assert second.url == url
        second.stop()
        second.stop()  # idempotent
        assert _server_answers(url)
    finally:
        handle.stop()
    assert not _server_answers(url)
    assert _handle_pids(pgdata) == []


@pytest.mark.skipif(
    bool(os.environ.get("FORGE_TEST_POSTGRES_URL")), reason="tests the embedded session server"
)
def test_session_server_survives_another_pytest_session_starting(
    pg_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A pytest session that starts makes pytest's temporary root private again, as here.
    # Were the session server's data below it, its system user (as root) could no longer
    # reach it and the server would PANIC at its next checkpoint, then stay down.
    root = tmp_path_factory.getbasetemp().parent
    if root.name.startswith("pytest-of-"):
        root.chmod(root.stat().st_mode & ~0o077)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    assert _server_answers(pg_url)


def test_the_server_stops_when_its_holder_is_killed(
    pg_tmp_path: Path, holders: Callable[[Path], Holder]
) -> None:
    pgdata = pg_tmp_path / "postgres"
    holder = holders(pgdata)
    postmaster = _postmaster_pid(pgdata)
    assert _server_answers(holder.url)
    holder.kill()  # SIGKILL: no exit handler runs
    assert _eventually(lambda: _gone(postmaster)), "PostgreSQL outlived its killed holder"
    assert _handle_pids(pgdata) == []
    assert _eventually(lambda: _gone(holder.watchdog_pid))
    assert "its last holder died" in (pg_tmp_path / "postgres-watchdog.log").read_text()


def test_a_normal_release_stops_the_server_and_its_watchdog(
    pg_tmp_path: Path, holders: Callable[[Path], Holder]
) -> None:
    pgdata = pg_tmp_path / "postgres"
    holder = holders(pgdata)
    postmaster = _postmaster_pid(pgdata)
    assert holder.release() == 0
    assert _eventually(lambda: _gone(postmaster))
    assert _eventually(lambda: _gone(holder.watchdog_pid))
    assert _handle_pids(pgdata) == []
    # The server was stopped by the release, not by the watchdog.
    assert "its last holder died" not in (pg_tmp_path / "postgres-watchdog.log").read_text()


@pytest.mark.parametrize("killed_first", ["joiner", "starter"])
def test_a_shared_server_stops_when_its_last_holder_is_killed(
    pg_tmp_path: Path, holders: Callable[[Path], Holder], killed_first: str
) -> None:
    # Two processes on one FORGE_HOME: the second joins the server the first started.
    pgdata = pg_tmp_path / "postgres"
    starter = holders(pgdata)
    postmaster = _postmaster_pid(pgdata)
    joiner = holders(pgdata)
    assert joiner.url == starter.url
    assert _postmaster_pid(pgdata) == postmaster
    assert sorted(_handle_pids(pgdata)) == sorted([starter.pid, joiner.pid])
    first, last = (joiner, starter) if killed_first == "joiner" else (starter, joiner)

    first.kill()
    # Its watchdog let go for it, and the server stays up for the process still using it.
    assert _eventually(lambda: _handle_pids(pgdata) == [last.pid])
    assert _eventually(lambda: _gone(first.watchdog_pid))
    assert not _gone(postmaster)
    assert _server_answers(last.url)

    last.kill()
    assert _eventually(lambda: _gone(postmaster)), "PostgreSQL outlived its last holder"
    assert _handle_pids(pgdata) == []


def test_a_killed_worker_takes_its_embedded_postgres_with_it(
    pg_tmp_path: Path, ctx: Context
) -> None:
    """``forge worker`` on embedded defaults starts PostgreSQL at its first new-data
    event (on a handler thread); a SIGKILL of the worker must stop it too."""
    home = pg_tmp_path / "home"
    records = [{"id": f"r{i}", "vector": [float(i), 1.0, 0.0]} for i in range(3)]
    event = {"type": "new-data", "id": "e1", "collection": "c", "records": records}
    publish(ctx.redis, ctx.keys.new_data, event)
    env = {k: v for k, v in _ENV.items() if k != "POSTGRES_URL"}
    env.update(
        REDIS_URL=TEST_REDIS_URL,
        FORGE_STREAM_PREFIX=ctx.settings.stream_prefix,
        FORGE_HOME=str(home),
        FORGE_READ_BLOCK_S="0.05",
    )
    with (pg_tmp_path / "worker.log").open("wb") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "forge.cli.main", "worker", "--http-port", "0"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: len(completions(ctx)) == 1 or worker.poll() is not None, 120)
        assert worker.poll() is None, (pg_tmp_path / "worker.log").read_text()[-2000:]
        assert completions(ctx)[0].status == "succeeded"
        postmaster = _postmaster_pid(home / "data" / "postgres")
    finally:
        worker.kill()
        worker.wait(60)
    assert _eventually(lambda: _gone(postmaster)), "PostgreSQL outlived the killed worker"


def test_a_failed_start_ends_its_watchdog(
    pg_tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pgdata = (pg_tmp_path / "postgres").resolve()
    started: list[subprocess.Popen[bytes]] = []

    def watched(folder: Path) -> subprocess.Popen[bytes]:
        started.append(start_watchdog(folder))
        return started[-1]

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("initdb failed")

    monkeypatch.setattr(embedded_postgres, "start_watchdog", watched)
    monkeypatch.setattr(embedded_postgres._pgserver(), "get_server", broken)
    with pytest.raises(EmbeddedServerError, match="initdb failed"):
        start_embedded_postgres(pgdata)
    (watchdog,) = started
    assert watchdog.returncode is not None  # ended and reaped
    assert pgdata not in embedded_postgres._watchdogs
    assert pgdata not in embedded_postgres._refcounts
