"""``POST /v1/models/{model}/predict``, the hot path: the body (bounded) decoded with
msgspec, the call submitted to the micro-batcher, the answer encoded.

It is served twice over: as a FastAPI route, which the OpenAPI document describes, and
by ``FastPredict``, plain ASGI in front of the app, which answers the same requests
the same way without Starlette's routing, request object and FastAPI's parameter
resolution: on a single-row prediction those cost more than the model.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
from fastapi import FastAPI, Request
from starlette.responses import Response

from forge.serving import api_types as api
from forge.serving.auth import ASGIApp, Receive, Scope, Send
from forge.serving.batcher import MicroBatcher
from forge.serving.calls import PredictCall, PredictError
from forge.serving.http_errors import (
    BAD_REQUEST,
    JSON,
    SERVER_ERROR,
    TOO_LARGE,
    UNAVAILABLE,
    HttpError,
    decode,
    error_body,
    read_body,
)
from forge.serving.openapi import documented

log = structlog.get_logger(__name__)

PATH = "/v1/models/{model}/predict"
_PREFIX, _SUFFIX = "/v1/models/", "/predict"
_decoder = msgspec.json.Decoder(api.PredictBody)
_encoder = msgspec.json.Encoder()
_JSON_HEADER = (b"content-type", JSON.encode())


class PredictHandler:
    """From a request body to the status and body of the response."""

    def __init__(self, batcher: Callable[[], MicroBatcher | None], limit: int) -> None:
        self._batcher = batcher
        self.limit = limit

    async def respond(
        self, model: str, read: Callable[[], Awaitable[bytes | None]], arrived_s: float
    ) -> tuple[int, bytes] | None:
        """The response to the body ``read()`` returns (None: the client went away, and
        gets no response). The batcher expects the call while the body is read."""
        batcher = self._batcher()
        if batcher is None:
            return UNAVAILABLE, error_body("the server is not serving predictions now")
        batcher.expect()
        try:
            body = await read()
            parsed = None if body is None else decode(_decoder, body)
        except HttpError as exc:
            batcher.abandon()
            return exc.status, error_body(exc.message)
        except BaseException:
            batcher.abandon()
            raise
        if parsed is None:
            batcher.abandon()
            return None
        call = PredictCall(model, parsed.inputs, parsed.key, parsed.version, arrived_s=arrived_s)
        result = await batcher.submit(call, expected=True)
        if isinstance(result, PredictError):
            return result.status, error_body(str(result))
        answer = api.PredictResponse(
            id=result.prediction_id,
            model=result.model,
            version=result.version,
            variant=result.variant,
            predictions=result.predictions,
        )
        return 200, _encoder.encode(answer)


def add_route(app: FastAPI, handler: PredictHandler) -> None:
    """The documented route (reached when ``FastPredict`` is not in front)."""

    @app.post(
        PATH,
        summary="Label inputs with a model's routed (or pinned) version",
        **documented(api.PredictBody, api.PredictResponse, 400, 404, 413, 422, 500, 503),
    )
    async def predict(model: str, request: Request) -> Response:
        arrived_s = time.perf_counter()
        read = functools.partial(read_body, request, handler.limit)
        answered = await handler.respond(model, read, arrived_s)
        status, payload = answered or (BAD_REQUEST, error_body("no body"))
        return Response(payload, status, media_type=JSON)


class FastPredict:
    """ASGI middleware answering predict requests itself; everything else goes on."""

    def __init__(self, app: ASGIApp, handler: PredictHandler) -> None:
        self.app = app
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = _model(scope) if scope["type"] == "http" else None
        if model is None:
            await self.app(scope, receive, send)
            return
        arrived_s = time.perf_counter()
        try:
            read = functools.partial(_body, scope, receive, self.handler.limit)
            answered = await self.handler.respond(model, read, arrived_s)
            if answered is None:
                return  # the client went away
            status, payload = answered
        except Exception:
            log.exception("prediction request failed", model=model)
            status, payload = SERVER_ERROR, error_body("internal error")
        headers = [_JSON_HEADER, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _model(scope: Scope) -> str | None:
    """The model of a predict request, matched as Starlette matches ``PATH``."""
    path: str = scope["path"]
    if scope["method"] != "POST" or not path.startswith(_PREFIX) or not path.endswith(_SUFFIX):
        return None
    model = path[len(_PREFIX) : -len(_SUFFIX)]
    return model if model and "/" not in model else None


async def _body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """As ``read_body``: the declared length first, then the bytes received."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                raise HttpError(BAD_REQUEST, "invalid Content-Length")
            if int(value) > limit:
                raise HttpError(TOO_LARGE, f"request body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Any = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HttpError(TOO_LARGE, f"request body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
