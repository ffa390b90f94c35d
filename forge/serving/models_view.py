"""What ``GET /v1/models`` and ``GET /v1/models/{model}`` show: the registry's models
and versions (aliases, training metrics), each model's route, and each version's
online counters. Read from the registry and Redis on every call, not from what this
server has loaded: it is the state every server converges to."""

from __future__ import annotations

from datetime import UTC, datetime

import redis

from forge.keys import Keys
from forge.serving.api_types import (
    ModelsResponse,
    ModelSummary,
    ModelView,
    OnlineStats,
    RouteView,
    VersionView,
)
from forge.serving.records import CORRECT, FEEDBACK, PREDICTIONS
from forge.serving.routing import Route, RouteStore
from forge.training.versions import ModelVersions, VersionInfo


class ModelsView:
    def __init__(
        self, versions: ModelVersions, routes: RouteStore, client: redis.Redis, keys: Keys
    ) -> None:
        self.versions = versions
        self.routes = routes
        self.client = client
        self.keys = keys

    def all(self) -> ModelsResponse:
        models = []
        for name in self.versions.models():
            latest = self.versions.latest(name)
            models.append(
                ModelSummary(
                    name=name,
                    latest=latest.version if latest else None,
                    aliases=self.versions.aliases(name),
                    route=_route(self.routes.get(name)),
                )
            )
        return ModelsResponse(models=models)

    def show(self, model: str) -> ModelView:
        """``ModelNotFound`` for a model that does not exist."""
        aliases = self.versions.aliases(model)
        found = self.versions.all(model)
        online = self._online(model, [v.version for v in found])
        return ModelView(
            name=model,
            aliases=aliases,
            route=_route(self.routes.get(model)),
            versions=[self._version(v, online[v.version]) for v in found],
        )

    def _version(self, version: VersionInfo, online: OnlineStats) -> VersionView:
        created = datetime.fromtimestamp(version.created_at_ms / 1000, UTC)
        return VersionView(
            version=version.version,
            aliases=version.aliases,
            task=version.task,
            primary_metric=version.primary_metric,
            metrics=self.versions.metrics(version),
            embedding_model=version.embedding_model,
            collection=version.collection,
            created_at=created.isoformat(),
            online=online,
        )

    def _online(self, model: str, numbers: list[int]) -> dict[int, OnlineStats]:
        pipe = self.client.pipeline(transaction=False)
        for number in numbers:
            pipe.hmget(self.keys.variant_stats(model, number), [PREDICTIONS, FEEDBACK, CORRECT])
        counts = pipe.execute() if numbers else []
        return {
            number: OnlineStats(predictions=int(p or 0), feedback=int(f or 0), correct=int(c or 0))
            for number, (p, f, c) in zip(numbers, counts, strict=True)
        }


def _route(route: Route) -> RouteView:
    return RouteView(split=list(route.split), shadow=route.shadow, policy=route.policy)
