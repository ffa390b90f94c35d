"""The observability endpoint: ``GET /health`` and ``GET /metrics``, nothing else.

A stdlib threaded server in a daemon thread: it serves a probe and a scraper, so it
needs no framework. It never echoes configuration, request data or exception
messages (they may hold hostnames or credentials), and logs requests at debug only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import msgspec
import structlog

log = structlog.get_logger(__name__)

_JSON = "application/json"
_ALLOWED = "GET, HEAD"
_REQUEST_TIMEOUT_S = 10.0  # a stuck client must not hold a thread forever
_STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class HealthReport:
    ok: bool
    reason: str = ""
    checks: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body: dict[str, Any] = {"status": "ok" if self.ok else "unhealthy"}
        if not self.ok:
            body["reason"] = self.reason
        body["checks"] = self.checks
        return msgspec.json.encode(body)


class HealthCheck:
    """Liveness of a worker: Redis answers and the main loop keeps turning.

    ``redis_ping`` should raise on failure and use a short socket timeout, since a
    probe waits for it. The loop calls ``beat()`` every iteration; a fresh check counts
    as a beat so that a worker is not reported stalled while it starts.
    """

    def __init__(
        self,
        redis_ping: Callable[[], object],
        loop_heartbeat_max_age_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis_ping = redis_ping
        self._max_age_s = loop_heartbeat_max_age_s
        self._clock = clock
        self._last_beat_s = clock()

    def beat(self) -> None:
        self._last_beat_s = self._clock()

    def __call__(self) -> HealthReport:
        age_s = self._clock() - self._last_beat_s
        loop = "ok" if age_s <= self._max_age_s else f"stalled for {age_s:.0f}s"
        try:
            self._redis_ping()
        except Exception as exc:
            reason = f"redis unreachable: {type(exc).__name__}"
            return HealthReport(False, reason, {"redis": "unreachable", "worker_loop": loop})
        checks = {"redis": "ok", "worker_loop": loop}
        if loop != "ok":
            return HealthReport(False, f"worker loop {loop}", checks)
        return HealthReport(True, "", checks)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        health: Callable[[], HealthReport],
        metrics: Callable[[], tuple[bytes, str]],
    ) -> None:
        self.health = health
        self.metrics = metrics
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = _REQUEST_TIMEOUT_S
    server_version = "forge"
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b'{"error":"method not allowed"}\n', _JSON)

    # The stdlib dispatches on ``do_<METHOD>``; without these it would answer 501.
    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815
    do_TRACE = do_CONNECT = _not_allowed  # noqa: N815

    def _respond(self, *, send_body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/health":
            status, body, content_type = self._health()
        elif path == "/metrics":
            status, body, content_type = self._metrics()
        else:
            status, body, content_type = HTTPStatus.NOT_FOUND, b'{"error":"not found"}\n', _JSON
        self._send(status, body, content_type, send_body=send_body)

    def _health(self) -> tuple[HTTPStatus, bytes, str]:
        try:
            report = self.server.health()
        except Exception as exc:
            log.warning("health check raised", error=type(exc).__name__)
            report = HealthReport(False, f"health check failed: {type(exc).__name__}")
        status = HTTPStatus.OK if report.ok else HTTPStatus.SERVICE_UNAVAILABLE
        return status, report.to_json() + b"\n", _JSON

    def _metrics(self) -> tuple[HTTPStatus, bytes, str]:
        try:
            body, content_type = self.server.metrics()
        except Exception:
            log.exception("rendering metrics failed")
            return HTTPStatus.INTERNAL_SERVER_ERROR, b"metrics unavailable\n", "text/plain"
        return HTTPStatus.OK, body, content_type

    def _send(
        self, status: HTTPStatus, body: bytes, content_type: str, *, send_body: bool = True
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", _ALLOWED)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes and scrapes arrive every few seconds: not worth more than debug.
        log.debug("http request", client=self.client_address[0], line=format % args)


@dataclass(slots=True)
class HttpServerHandle:
    """A running server. ``port`` is the bound port (useful when 0 was asked for)."""

    host: str
    port: int
    _server: _Server
    _thread: threading.Thread

    def stop(self) -> None:
        """Stop serving and release the port; safe to call more than once."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(_STOP_TIMEOUT_S)
        self._server.server_close()

    def __enter__(self) -> HttpServerHandle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_http_server(
    host: str,
    port: int,
    health: Callable[[], HealthReport],
    metrics: Callable[[], tuple[bytes, str]],
) -> HttpServerHandle:
    """Serve ``/health`` and ``/metrics`` on ``host:port`` from a daemon thread.

    Raises ``OSError`` when the address cannot be bound (port in use, bad host).
    """
    server = _Server((host, port), health, metrics)
    bound_port = int(server.server_address[1])
    thread = threading.Thread(
        target=server.serve_forever, name=f"forge-http-{bound_port}", daemon=True
    )
    thread.start()
    log.info("http server listening", host=host, port=bound_port)
    return HttpServerHandle(host, bound_port, server, thread)
