"""A running ``forge serve`` as commands use it: found by a quick ``GET /health`` at the
configured address, then asked over HTTP. Standard library only (``http.client``):
``forge predict`` and ``forge search`` must stay quick to start when no server runs,
and then pay one refused connection, not an HTTP client's import.
"""

from __future__ import annotations

import http.client
from typing import Any
from urllib.parse import quote

import msgspec

from forge.errors import ForgeError
from forge.settings import Settings

PROBE_TIMEOUT_S = 0.3
REQUEST_TIMEOUT_S = 120.0
_OK = 200
_UNAUTHORIZED = 401
# Addresses that mean "every interface": a client reaches them on loopback.
_ANY = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


class ServerClient:
    def __init__(self, host: str, port: int, token: str | None = None) -> None:
        self.host = _ANY.get(host, host).strip("[]")
        self.port = port
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @classmethod
    def find(cls, settings: Settings) -> ServerClient | None:
        """A client of the server at ``serve_host:serve_port`` if one answers now."""
        client = cls(settings.serve_host, settings.serve_port, settings.api_token)
        try:
            status, _ = client._request("GET", "/health", None, PROBE_TIMEOUT_S)
        except (OSError, http.client.HTTPException):
            return None
        return client if status == _OK else None

    def predict(
        self, model: str, inputs: list[dict[str, Any]], version: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"inputs": inputs}
        if version is not None:
            body["version"] = version
        return dict(self._call("POST", f"/v1/models/{quote(model, safe='')}/predict", body))

    def model(self, model: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/models/{quote(model, safe='')}", None))

    def search(
        self, collection: str, text: str, k: int, filters: dict[str, str]
    ) -> list[dict[str, Any]]:
        path = f"/v1/collections/{quote(collection, safe='')}/search"
        found = self._call("POST", path, {"text": text, "k": k, "filter": filters})
        return list(found["results"])

    def _call(self, method: str, path: str, body: Any) -> Any:
        """The decoded answer; the server's one-line error as a ``ForgeError``."""
        try:
            status, data = self._request(method, path, body, REQUEST_TIMEOUT_S)
        except (OSError, http.client.HTTPException) as exc:
            raise ForgeError(f"the server at {self.url} did not answer: {exc}") from None
        try:
            answer = msgspec.json.decode(data)
        except msgspec.DecodeError:
            raise ForgeError(f"the server at {self.url} answered {status}, not JSON") from None
        if status == _OK:
            return answer
        message = answer.get("error", "") if isinstance(answer, dict) else ""
        if status == _UNAUTHORIZED:
            message = f"the server at {self.url} refused the request (FORGE_API_TOKEN?): {message}"
        raise ForgeError(message or f"the server at {self.url} answered {status}")

    def _request(self, method: str, path: str, body: Any, timeout_s: float) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
        try:
            payload = None if body is None else msgspec.json.encode(body)
            conn.request(method, path, payload, self._headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()
