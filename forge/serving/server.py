"""Running the HTTP API on uvicorn: in this process, or under ``--workers N`` in N
processes sharing one listening socket (uvicorn's supervisor; each worker loads its
own models and batches its own requests).

Workers are fresh interpreters (uvicorn spawns them) that build the app from the
environment (``app_from_env``), so the parent hands down what it resolved: the Redis
URL (an embedded server is started by the parent, once) and the folder where every
worker's metrics meet, so that /metrics on any worker reports all of them (see
``forge.observability.metrics``: counters and histograms sum over workers). uvicorn
replaces a worker that dies under a new pid; the supervisor then drops the dead one's
live gauges from that folder (``_Supervisor``), so its last values leave /metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from uvicorn.supervisors import Multiprocess

from forge.errors import ConfigError
from forge.observability.metrics import (
    MULTIPROC_DIR_ENV,
    mark_worker_dead,
    prepare_multiprocess_dir,
)
from forge.settings import Settings

log = structlog.get_logger(__name__)

APP_FACTORY = "forge.serving.app:app_from_env"
_BACKLOG = 2048
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def serve(settings: Settings, app: Any | None = None) -> int:
    """Serve until SIGTERM or SIGINT. ``app``: the ASGI app of a single worker (built
    by the caller, who owns its Redis client); workers build their own."""
    sock = bind(settings.serve_host, settings.serve_port)
    address = _address(sock)
    quiet_uvicorn()
    quiet_torch_threads()
    if settings.serve_workers > 1:
        return _serve_workers(settings, sock, address)
    assert app is not None
    config = _config(app, settings)
    server = _ReadyServer(config, address)
    server.run(sockets=[sock])
    return 0 if server.started else 1


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``; ``ConfigError`` says why not in one line."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def quiet_torch_threads() -> None:
    """torch's OpenMP workers, told not to spin between calls. Spinning workers sit on
    the core the event loop needs (measured at 4 connections on 2 cores: over four
    times the CPU per single-row request), while fewer threads would halve what a
    text model's encoder gets. OpenMP reads the policy when torch loads, hence before
    the first import; an operator's own setting wins."""
    import sys

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def quiet_uvicorn() -> None:
    """uvicorn's startup chatter is several lines; Forge logs one (see ``_ReadyServer``)."""
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").disabled = True


def _config(app: Any, settings: Settings, **extra: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        backlog=_BACKLOG,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        **extra,
    )


class _ReadyServer(uvicorn.Server):
    """Logs the one line that says the API answers, once it does, and stops on SIGTERM
    or SIGINT by returning: uvicorn's own handling raises the signal again once it has
    stopped, which would end the process before the command closes what it opened (an
    embedded Redis among them)."""

    def __init__(self, config: uvicorn.Config, address: str) -> None:
        super().__init__(config)
        self.address = address

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info("serving predictions", url=self.address, workers=1)


def _serve_workers(settings: Settings, sock: socket.socket, address: str) -> int:
    metrics_dir = prepare_multiprocess_dir(Path(tempfile.mkdtemp(prefix="forge-serve-metrics-")))
    # Spawned workers read their settings from the environment, as the parent's are.
    os.environ[MULTIPROC_DIR_ENV] = str(metrics_dir)
    if settings.redis_url:
        os.environ["REDIS_URL"] = settings.redis_url
    config = _config(APP_FACTORY, settings, factory=True, workers=settings.serve_workers)
    supervisor = _Supervisor(config, [sock], metrics_dir)
    log.info("serving predictions", url=address, workers=settings.serve_workers)
    try:
        supervisor.run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


class _Supervisor(Multiprocess):
    """uvicorn's supervisor, which also marks every worker that leaves it dead in the
    metrics folder: one that died or hung (uvicorn kills and replaces it) and one
    retired by SIGHUP or SIGTTOU. Its counters and histograms stay, as Prometheus
    expects; its gauges, all ``live*`` modes, leave the sums at once rather than at
    the next restart. A replacement that never got ready (SIGHUP) served nothing and
    is not looked for."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], metrics_dir: Path):
        super().__init__(config, sockets)
        self._metrics_dir = metrics_dir
        self._workers: set[int] = set()

    def init_processes(self) -> None:
        super().init_processes()
        self._forget_gone()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self._forget_gone()

    def handle_signals(self) -> None:
        super().handle_signals()
        self._forget_gone()

    def _forget_gone(self) -> None:
        current = {p.pid for p in self.processes if p.pid is not None}
        for pid in sorted(self._workers - current):
            mark_worker_dead(self._metrics_dir, pid)
            log.info("serving worker gone: its gauges left the metrics", pid=pid)
        self._workers = current


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
