"""Who may call the HTTP API: with ``FORGE_API_TOKEN`` set, requests carrying it as a
bearer token (``/health`` stays open, for probes); without it, only this machine, as
``forge serve`` refuses to listen beyond loopback then."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

from forge.errors import ConfigError
from forge.settings import Settings

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})
_UNAUTHORIZED = msgspec.json.encode({"error": "missing or wrong bearer token"}) + b"\n"
_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_UNAUTHORIZED)).encode()),
    (b"www-authenticate", b"Bearer"),
]


class BearerAuth:
    """ASGI middleware: 401 unless ``Authorization: Bearer <token>`` (compared in
    constant time). Plain ASGI, not Starlette's ``BaseHTTPMiddleware``: it adds no
    task or copy to a request."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401, "headers": _HEADERS})
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})

    def _allowed(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = bytes(value).partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    credentials.strip(), self._token
                )
        return False


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse to serve beyond loopback without a token: the API would be open to all."""
    if not settings.api_token and not is_loopback(settings.serve_host):
        raise ConfigError(
            f"refusing to serve on {settings.serve_host} without a token: set FORGE_API_TOKEN,"
            " or serve on 127.0.0.1"
        )
