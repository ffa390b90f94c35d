"""The OpenAPI document of the HTTP API: FastAPI's, with the request and response
schemas of ``api_types`` (msgspec) in place of FastAPI's own, every error as the
one-line ``ErrorBody``, and the bearer scheme when a token is required."""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.responses import Response

from forge.serving.api_types import ErrorBody, ref, schema_components
from forge.serving.auth import OPEN_PATHS

JSON = "application/json"
_FASTAPI_SCHEMAS = ("HTTPValidationError", "ValidationError")
_METHODS = ("get", "post", "put", "patch", "delete")


def documented(
    body: type[msgspec.Struct] | None,
    ok: type[msgspec.Struct] | None,
    *errors: int,
    **others: type[msgspec.Struct],
) -> dict[str, Any]:
    """Route keyword arguments that document a ``body`` and the responses: ``ok`` as
    200 (None: Prometheus text), ``errors`` as ``ErrorBody``, and ``others`` by status
    (``s503=HealthResponse``)."""
    if ok is None:
        success = {"text/plain": {"schema": {"type": "string"}}}
    else:
        success = {JSON: {"schema": ref(ok)}}
    responses: dict[int | str, Any] = {200: {"description": "OK", "content": success}}
    for status in errors:
        responses[status] = _response(status, ErrorBody)
    for name, kind in others.items():
        responses[int(name.removeprefix("s"))] = _response(int(name.removeprefix("s")), kind)
    extra = None
    if body is not None:
        extra = {"requestBody": {"required": True, "content": {JSON: {"schema": ref(body)}}}}
    return {"responses": responses, "openapi_extra": extra, "response_class": Response}


def _response(status: int, kind: type[msgspec.Struct]) -> dict[str, Any]:
    return {"description": HTTPStatus(status).phrase, "content": {JSON: {"schema": ref(kind)}}}


def openapi_factory(app: FastAPI, *, secured: bool) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = _finish(document, secured)
        return app.openapi_schema

    return openapi


def _finish(document: dict[str, Any], secured: bool) -> dict[str, Any]:
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in _FASTAPI_SCHEMAS:
        schemas.pop(name, None)
    schemas.update(schema_components())
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in document.get("paths", {}).items():
        for method in _METHODS:
            operation = operations.get(method)
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            if "422" in responses:  # FastAPI's own, for routes with parameters
                responses["422"] = _response(422, ErrorBody)
            if path not in OPEN_PATHS:
                responses["401"] = _response(401, ErrorBody)
                if secured:
                    operation["security"] = [{"bearer": []}]
    return document
