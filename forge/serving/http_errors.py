"""Every HTTP error as one line of JSON, ``{"error": "..."}``: bad bodies, unknown
routes, oversized uploads, and (never expected) server failures, whose details stay in
the log. Request bodies are read here, bounded by bytes whatever the client claims.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

log = structlog.get_logger(__name__)

JSON = "application/json"
BAD_REQUEST = 400
TOO_LARGE = 413
UNPROCESSABLE = 422
SERVER_ERROR = 500
UNAVAILABLE = 503

T = TypeVar("T")
_encoder = msgspec.json.Encoder()
_MESSAGES = {404: "not found", 405: "method not allowed"}


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(message: str) -> bytes:
    return _encoder.encode({"error": " ".join(message.split())}) + b"\n"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status, headers, media_type=JSON)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or ``HttpError`` 413 once it is (or is announced to be) over ``limit``
    bytes: the declared length is checked first, the bytes received are counted too."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.isdigit():
            raise HttpError(BAD_REQUEST, "invalid Content-Length")
        if int(declared) > limit:
            raise HttpError(TOO_LARGE, f"request body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(TOO_LARGE, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """``body`` as the decoder's type: 400 for what is not JSON, 422 for JSON that does
    not fit the type (msgspec's message names the field)."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise HttpError(UNPROCESSABLE, f"invalid body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise HttpError(BAD_REQUEST, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise HttpError(BAD_REQUEST, "malformed JSON: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise HttpError(BAD_REQUEST, f"malformed JSON: invalid UTF-8 ({exc.reason})") from None


def install(app: FastAPI) -> None:
    """Route every error FastAPI and Starlette raise to a one-line JSON body."""

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HttpError)
        return error_response(exc.status, exc.message)

    async def starlette_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = _MESSAGES.get(exc.status_code) or str(exc.detail)
        return error_response(exc.status_code, message, dict(exc.headers or {}))

    async def invalid_request(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(UNPROCESSABLE, f"invalid request: {first.get('msg', '')} at {where}")

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("request failed", path=request.url.path, error=type(exc).__name__, exc_info=exc)
        return error_response(SERVER_ERROR, "internal error")

    app.add_exception_handler(HttpError, http_error)
    app.add_exception_handler(HTTPException, starlette_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, server_error)
