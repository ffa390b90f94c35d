"""The HTTP door of ``forge serve``: FastAPI routes over the prediction engine.

Bodies are read here, bounded, and decoded with msgspec into the same types the OpenAPI
document is generated from (``api_types``); responses are encoded bytes. Predictions,
the hot path, are answered in front of FastAPI (``predict_route``) and coalesced into
engine batches by ``MicroBatcher``; the engine refreshes its routes on a thread of its
own (``Reloader``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import redis
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from forge import __version__
from forge.errors import ConfigError, InvalidEvent
from forge.keys import Keys
from forge.observability.metrics import MULTIPROC_DIR_ENV, Metrics, render_multiprocess
from forge.serving import api_types as api
from forge.serving.auth import BearerAuth
from forge.serving.batcher import MicroBatcher
from forge.serving.engine import PredictionEngine
from forge.serving.http_errors import (
    JSON,
    UNAVAILABLE,
    HttpError,
    decode,
    install,
    read_body,
)
from forge.serving.models_view import ModelsView
from forge.serving.openapi import documented, openapi_factory
from forge.serving.predict_route import FastPredict, PredictHandler, add_route
from forge.serving.reloader import Reloader
from forge.serving.routing import RouteStore
from forge.serving.search import LazySearch
from forge.settings import Settings
from forge.training.versions import ModelNotFound

_search_body = msgspec.json.Decoder(api.SearchBody)
_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class Services:
    """What the routes use. ``render_metrics`` returns the exposition and its type."""

    settings: Settings
    client: redis.Redis
    engine: PredictionEngine
    render_metrics: Callable[[], tuple[bytes, str]]
    search: LazySearch
    models: ModelsView
    batcher: MicroBatcher | None = None
    reloader: Reloader | None = None


def services(
    settings: Settings,
    client: redis.Redis,
    metrics: Metrics | None = None,
    engine: PredictionEngine | None = None,
) -> Services:
    """The app's services on ``client``; ``engine`` given: its metrics must be on
    ``metrics``' registry for /metrics to show them."""
    metrics = metrics or Metrics()
    if engine is None:
        engine = PredictionEngine.from_settings(settings, client, metrics.serving)
    keys = Keys.from_settings(settings)
    view = ModelsView(engine.training.versions, RouteStore(client, keys), client, keys)
    search = LazySearch(settings, engine.embedding)
    return Services(settings, client, engine, _renderer(metrics), search, view)


def create_app(found: Services) -> Any:
    """The ASGI app: the FastAPI app behind the predict fast path, both behind bearer
    auth when a token is set."""
    app = FastAPI(
        title="Forge",
        version=__version__,
        description="Online predictions and collection search.",
        lifespan=_lifespan(found),
        docs_url=None,
        redoc_url=None,
    )
    install(app)
    predict = PredictHandler(lambda: found.batcher, found.settings.serve_max_body_bytes)
    add_route(app, predict)
    _search_route(app, found)
    _read_routes(app, found)
    app.openapi = openapi_factory(app, secured=bool(found.settings.api_token))  # type: ignore[method-assign]
    fast = FastPredict(app, predict)
    token = found.settings.api_token
    return BearerAuth(fast, token) if token else fast


def _lifespan(found: Services) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        settings = found.settings
        batcher = MicroBatcher(
            found.engine.predict,
            max_rows=settings.max_batch_size,
            max_wait_s=settings.serve_max_wait_ms / 1000,
        )
        batcher.start()
        found.batcher = batcher
        engine = found.engine
        found.reloader = Reloader(
            engine.refresh, settings.serve_reload_interval_s, wait=engine.wait_for_change
        )
        found.reloader.start()
        try:
            yield
        finally:
            found.reloader.stop()
            found.batcher = None
            await batcher.close()
            await run_in_threadpool(found.search.close)

    return lifespan


def _search_route(app: FastAPI, found: Services) -> None:
    limit = found.settings.serve_max_body_bytes

    @app.post(
        "/v1/collections/{collection}/search",
        summary="The records of a collection nearest to a text",
        **documented(api.SearchBody, api.SearchResponse, 400, 404, 413, 422),
    )
    async def search(collection: str, request: Request) -> Response:
        body = decode(_search_body, await read_body(request, limit))
        if len(body.text) > found.settings.max_text_chars:
            raise HttpError(422, f"the text is over {found.settings.max_text_chars} characters")
        try:
            hits = await run_in_threadpool(
                found.search.search, collection, body.text, body.k, body.filter
            )
        except (ConfigError, InvalidEvent) as exc:
            raise HttpError(404, str(exc)) from None
        results = [
            api.SearchHit(id=h.id, score=h.score, text=h.text, metadata=h.metadata) for h in hits
        ]
        return Response(_encoder.encode(api.SearchResponse(results=results)), media_type=JSON)


def _read_routes(app: FastAPI, found: Services) -> None:
    @app.get(
        "/v1/models",
        summary="Models, their aliases and routes",
        **documented(None, api.ModelsResponse),
    )
    def list_models() -> Response:
        return Response(_encoder.encode(found.models.all()), media_type=JSON)

    @app.get(
        "/v1/models/{model}",
        summary="A model's versions, aliases, metrics, split and shadow",
        **documented(None, api.ModelView, 404),
    )
    def show_model(model: str) -> Response:
        try:
            view = found.models.show(model)
        except ModelNotFound as exc:
            raise HttpError(404, str(exc)) from None
        return Response(_encoder.encode(view), media_type=JSON)

    @app.get(
        "/health",
        summary="Liveness",
        **documented(None, api.HealthResponse, s503=api.HealthResponse),
    )
    def health() -> Response:
        checks = {"redis": "ok", "reload": "ok"}
        try:
            found.client.ping()
        except redis.RedisError:
            checks["redis"] = "unreachable"
        if found.reloader is not None and found.reloader.stale:
            checks["reload"] = "stale"
        ok = checks["redis"] == "ok"
        report = api.HealthResponse(status="ok" if ok else "unhealthy", checks=checks)
        return Response(_encoder.encode(report), 200 if ok else UNAVAILABLE, media_type=JSON)

    @app.get("/metrics", summary="Prometheus metrics", **documented(None, None))
    def metrics() -> Response:
        body, content_type = found.render_metrics()
        return Response(body, media_type=content_type)


def _renderer(metrics: Metrics) -> Callable[[], tuple[bytes, str]]:
    """This process's metrics, or under ``--workers`` every worker's (see
    ``forge.observability.metrics``, multi-process mode)."""
    shared = os.environ.get(MULTIPROC_DIR_ENV)
    if not shared:
        return metrics.render
    return functools.partial(render_multiprocess, Path(shared), metrics)


def app_from_env() -> Any:
    """The app of one worker of ``forge serve --workers N``, from the environment the
    parent prepared (``forge.serving.server``)."""
    from forge.observability.logging import configure_logging
    from forge.servers.connect import connect_redis
    from forge.serving.server import quiet_torch_threads, quiet_uvicorn

    settings = Settings.from_env()
    configure_logging(settings)
    quiet_uvicorn()
    quiet_torch_threads()
    if not settings.redis_url:
        raise ConfigError("a serving worker needs REDIS_URL (forge serve sets it)")
    client = connect_redis(settings.redis_url, cluster=settings.redis_cluster)
    return create_app(services(settings, client))
