from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from forge.embedded_postgres import SYSTEM_USER, resolve_postgres_url, start_embedded_postgres
from forge.settings import Settings

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[1]

# Starts the embedded server, then dies without any cleanup (like an OOM kill).
_KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
from forge.embedded_postgres import start_embedded_postgres
handle = start_embedded_postgres(Path(sys.argv[1]))
print(f"CHILD-PID {os.getpid()}", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _server_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def _handle_pids(pgdata: Path) -> list[int]:
    return [int(pid) for pid in json.loads((pgdata / ".handle_pids.json").read_text())]


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
        env={**os.environ, "PYTHONPATH": str(ROOT)},
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
