"""The HTTP API's bodies, as msgspec types: requests are decoded and validated by them,
responses encoded from them, and the OpenAPI document's schemas are generated from
the same types, so what the document says is what the server checks.

Inputs and pinned versions are the ``predict-request`` event's own types: both doors
take the same rows.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from forge.events import Label, PredictInputItem, VersionRef
from forge.serving.limits import MAX_INPUTS, MAX_K
from forge.serving.routing import Variant

REF_TEMPLATE = "#/components/schemas/{name}"


class PredictBody(msgspec.Struct, kw_only=True):
    inputs: Annotated[list[PredictInputItem], Meta(min_length=1, max_length=MAX_INPUTS)]
    key: Annotated[str, Meta(max_length=256)] | None = None
    # An alias, or a version number as a number or a string: bypasses the split.
    version: VersionRef | None = None


class PredictResponse(msgspec.Struct, kw_only=True):
    id: str
    model: str
    version: int
    variant: str
    predictions: list[Label]


class SearchBody(msgspec.Struct, kw_only=True):
    text: str
    k: Annotated[int, Meta(ge=1, le=MAX_K)] = 10
    filter: dict[str, str] = msgspec.field(default_factory=dict)


class SearchHit(msgspec.Struct, kw_only=True):
    id: str
    score: float
    text: str | None
    metadata: dict[str, Any]


class SearchResponse(msgspec.Struct, kw_only=True):
    results: list[SearchHit]


class ErrorBody(msgspec.Struct, kw_only=True):
    error: str


class RouteView(msgspec.Struct, kw_only=True):
    """A model's traffic split (empty: all to the champion), shadow and policy."""

    split: list[Variant]
    shadow: str | None
    policy: str


class OnlineStats(msgspec.Struct, kw_only=True):
    """Counters of a version's live traffic (served and shadow) and joined feedback."""

    predictions: int = 0
    feedback: int = 0
    correct: int = 0


class VersionView(msgspec.Struct, kw_only=True):
    version: int
    aliases: list[str]
    task: str
    primary_metric: str
    metrics: dict[str, float]
    embedding_model: str | None
    collection: str
    created_at: str
    online: OnlineStats


class ModelSummary(msgspec.Struct, kw_only=True):
    name: str
    latest: int | None
    aliases: dict[str, int]
    route: RouteView


class ModelsResponse(msgspec.Struct, kw_only=True):
    models: list[ModelSummary]


class ModelView(msgspec.Struct, kw_only=True):
    name: str
    aliases: dict[str, int]
    route: RouteView
    versions: list[VersionView]


class HealthResponse(msgspec.Struct, kw_only=True):
    status: str
    checks: dict[str, str]


DOCUMENTED: tuple[type[msgspec.Struct], ...] = (
    PredictBody,
    PredictResponse,
    SearchBody,
    SearchResponse,
    ErrorBody,
    ModelsResponse,
    ModelView,
    HealthResponse,
)


def schema_components() -> dict[str, Any]:
    """JSON Schemas of the documented types, by name, as OpenAPI components."""
    _, components = msgspec.json.schema_components(DOCUMENTED, ref_template=REF_TEMPLATE)
    return components


def ref(kind: type[msgspec.Struct]) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(name=kind.__name__)}
