"""The prediction engine both doors share (HTTP and the ``predict-requests`` stream).

A batch of calls is routed (a pinned version, else the model's split by key), grouped
by the version that scores them, and each version is called once for the whole batch:
its rows stacked, its texts embedded in one call. A route's shadow scores the same
rows in the same model call as everyone else using that version; its answers are
recorded, never returned. One call's bad inputs fail that call only.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import redis
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from forge.embedding.cache import EmbeddingCache
from forge.embedding.model_cache import ModelCache
from forge.embedding.service import EmbeddingService
from forge.errors import PermanentError
from forge.events import Label
from forge.keys import Keys
from forge.observability.serving_metrics import ServingMetrics
from forge.serving.calls import FAILED, NOT_FOUND, PredictAnswer, PredictCall, PredictError
from forge.serving.catalog import Catalog, Loaded
from forge.serving.records import PredictionLog, Served
from forge.serving.routing import RouteStore, choose
from forge.serving.rows import Inputs, Matrix, check_inputs, stack, wrong_dimension
from forge.settings import Settings
from forge.training.service import TrainingService
from forge.training.versions import ModelNotFound

__all__ = ["PredictAnswer", "PredictCall", "PredictError", "PredictionEngine"]

log = structlog.get_logger(__name__)

Result = PredictAnswer | PredictError
_SHADOW_PREFIX = "shadow:"
# Label of error counts for models that do not exist: names are the caller's to choose.
_UNKNOWN_MODEL = ""
_WARN_EVERY_S = 60.0


@dataclass(slots=True)
class _Use:
    """One call scored by one version: as the answer, or as the shadow."""

    index: int
    variant: str
    shadow: bool
    inputs: Inputs


@dataclass(slots=True)
class _Group:
    loaded: Loaded
    uses: list[_Use] = field(default_factory=list)


class PredictionEngine:
    def __init__(
        self,
        catalog: Catalog,
        embedding: EmbeddingService,
        log_: PredictionLog,
        metrics: ServingMetrics,
        settings: Settings,
        rng: random.Random | None = None,
    ) -> None:
        self.catalog = catalog
        self.embedding = embedding
        self.log = log_
        self.metrics = metrics
        self.settings = settings
        self.rng = rng or random.Random()
        # Input dimension of each (model, version), learnt from its first good batch:
        # models do not all say it, and a wrong one is then refused without a model call.
        self._dims: dict[tuple[str, int], int] = {}
        self._log_warned_s = -_WARN_EVERY_S
        self._series: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    @property
    def training(self) -> TrainingService:
        return self.catalog.training

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        client: redis.Redis,
        metrics: ServingMetrics | None = None,
        training: TrainingService | None = None,
        embedding: EmbeddingService | None = None,
    ) -> PredictionEngine:
        """An engine on ``client``'s Redis. Trained and embedding models share one model
        cache (one byte budget) unless the services given bring their own."""
        keys = Keys.from_settings(settings)
        models = (training.models if training else None) or (
            embedding.models if embedding else ModelCache.from_settings(settings)
        )
        training = training or TrainingService.from_settings(settings, models)
        if embedding is None:
            cache = EmbeddingCache.from_settings(client, settings)
            embedding = EmbeddingService(settings, models, cache)
        if metrics is None:
            metrics = ServingMetrics(CollectorRegistry())
        routes = RouteStore(client, keys)
        catalog = Catalog(training, routes, client, keys, settings.serve_registry_poll_s)
        prediction_log = PredictionLog(client, keys, settings.feedback_window_s)
        return cls(catalog, embedding, prediction_log, metrics, settings)

    def refresh(self) -> None:
        """Pick up route, alias and version changes; cheap when nothing changed."""
        self.catalog.refresh()

    # ------------------------------------------------------------------ predict

    def predict(self, calls: Sequence[PredictCall]) -> list[Result]:
        """One answer or error per call, in order."""
        results: list[Result | None] = [None] * len(calls)
        groups: dict[tuple[str, int], _Group] = {}
        for index, call in enumerate(calls):
            try:
                self._route(index, call, groups)
            except PredictError as exc:
                results[index] = exc
        scored: dict[tuple[int, bool], list[Label] | PredictError] = {}
        for group in groups.values():
            scored.update(self._score(group))
        served = self._answer(calls, groups, scored, results)
        self._record(served)
        final = [r if r is not None else PredictError("not scored", FAILED) for r in results]
        self._count_errors(calls, final)
        return final

    def _route(self, index: int, call: PredictCall, groups: dict[tuple[str, int], _Group]) -> None:
        try:
            state = self.catalog.state(call.model)
            if call.version is not None:
                variant = _ref(call.version)
                loaded, shadow = self.catalog.pinned(state, variant), None
            else:
                ref = choose(state.route, call.model, call.key, self.rng)
                variant, loaded = state.routed(ref)
                shadow = state.shadow()
        except ModelNotFound as exc:
            raise PredictError(str(exc), NOT_FOUND) from None
        except PermanentError as exc:  # a version whose files cannot be used
            raise PredictError(str(exc), FAILED) from None
        except Exception as exc:  # the registry or Redis failed: the caller may retry
            log.warning("model not loaded", model=call.model, error=f"{type(exc).__name__}: {exc}")
            raise PredictError(f"cannot load model {call.model!r} now", FAILED) from None
        inputs = check_inputs(call.inputs, self.settings.max_text_chars)
        _group(groups, loaded).uses.append(_Use(index, variant, False, inputs))
        if shadow is not None and shadow[1].info.version != loaded.info.version:
            _group(groups, shadow[1]).uses.append(_Use(index, shadow[0], True, inputs))

    def _score(self, group: _Group) -> dict[tuple[int, bool], list[Label] | PredictError]:
        """Every use of one version, in one model call per input dimension (one, unless
        some calls sent vectors of the wrong size)."""
        info = group.loaded.info
        label = group.loaded.label
        rows = stack([u.inputs for u in group.uses], info.embedding_model, self._embed, label)
        out: dict[tuple[int, bool], list[Label] | PredictError] = {}
        by_dim: dict[int, list[tuple[_Use, Matrix]]] = {}
        expected = self._dims.get((info.model, info.version))
        for use, matrix in zip(group.uses, rows, strict=True):
            if isinstance(matrix, PredictError):
                out[use.index, use.shadow] = matrix
            elif expected is not None and matrix.shape[1] != expected:
                out[use.index, use.shadow] = wrong_dimension(expected, matrix)
            else:
                by_dim.setdefault(matrix.shape[1], []).append((use, matrix))
        for dim, items in by_dim.items():
            out.update(self._call_model(group.loaded, dim, items))
        return out

    def _call_model(
        self, loaded: Loaded, dim: int, items: list[tuple[_Use, Matrix]]
    ) -> dict[tuple[int, bool], list[Label] | PredictError]:
        matrices = [m for _, m in items]
        stacked = matrices[0] if len(matrices) == 1 else np.concatenate(matrices)
        try:
            predictions = loaded.model.predict(stacked)
        except PermanentError as exc:  # the models' word for rows they cannot take
            error = PredictError(str(exc))
            return {(u.index, u.shadow): error for u, _ in items}
        except Exception as exc:
            log.exception("model call failed", model=loaded.info.model, version=loaded.info.version)
            error = PredictError(f"{loaded.label} failed: {type(exc).__name__}", FAILED)
            return {(u.index, u.shadow): error for u, _ in items}
        self._dims[loaded.info.model, loaded.info.version] = dim
        out: dict[tuple[int, bool], list[Label] | PredictError] = {}
        start = 0
        for use, matrix in items:
            chunk = predictions[start : start + len(matrix)]
            out[use.index, use.shadow] = [Label(label=p.label, score=p.score) for p in chunk]
            start += len(matrix)
        return out

    def _embed(self, model: str, texts: list[str]) -> Matrix:
        embedder = self.embedding.embedder(model)
        return self.embedding.encode(embedder, texts).vectors

    # ------------------------------------------------------------------ afterwards

    def _answer(
        self,
        calls: Sequence[PredictCall],
        groups: dict[tuple[str, int], _Group],
        scored: dict[tuple[int, bool], list[Label] | PredictError],
        results: list[Result | None],
    ) -> list[Served]:
        """Fill ``results`` with the answers; return every answer to record."""
        now = time.perf_counter()
        served: list[Served] = []
        for group in groups.values():
            version = group.loaded.info.version
            for use in group.uses:
                call = calls[use.index]
                labels = scored.get((use.index, use.shadow))
                if isinstance(labels, PredictError) or labels is None:
                    if not use.shadow:
                        results[use.index] = labels
                    continue
                if not use.shadow:
                    results[use.index] = PredictAnswer(
                        call.prediction_id, call.model, version, use.variant, labels
                    )
                served.append(
                    Served(
                        prediction_id=call.prediction_id,
                        model=call.model,
                        version=version,
                        variant=use.variant,
                        labels=[label.label for label in labels],
                        latency_s=now - call.arrived_s,
                        shadow=use.shadow,
                    )
                )
        return served

    def _record(self, served: list[Served]) -> None:
        for answer in served:
            variant = _SHADOW_PREFIX + answer.variant if answer.shadow else answer.variant
            counter, histogram = self._instruments(answer.model, variant)
            counter.inc(len(answer.labels))
            histogram.observe(answer.latency_s)
        try:
            self.log.record(served)
        except redis.RedisError as exc:
            # The log feeds the feedback join; answers are worth more than their record.
            now = time.monotonic()
            if now - self._log_warned_s >= _WARN_EVERY_S:
                self._log_warned_s = now
                log.warning("predictions not recorded", error=f"{type(exc).__name__}: {exc}")

    def _instruments(self, model: str, variant: str) -> tuple[Counter, Histogram]:
        """A variant's series, looked up once: ``labels()`` costs more than the update."""
        key = (model, variant)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = (
                self.metrics.predictions_total.labels(model, variant),
                self.metrics.prediction_latency_seconds.labels(model, variant),
            )
        return found

    def _count_errors(self, calls: Sequence[PredictCall], results: list[Result]) -> None:
        for call, result in zip(calls, results, strict=True):
            if isinstance(result, PredictError):
                known = self.catalog.get(call.model) is not None
                model = call.model if known else _UNKNOWN_MODEL
                self.metrics.prediction_errors_total.labels(model, result.reason).inc()


def _group(groups: dict[tuple[str, int], _Group], loaded: Loaded) -> _Group:
    key = (loaded.info.model, loaded.info.version)
    found = groups.get(key)
    if found is None:
        found = groups[key] = _Group(loaded)
    return found


def _ref(version: str | int) -> str:
    """A pinned version as a variant name: numbers in one spelling (3, "3", "003")."""
    text = str(version)
    return str(int(text)) if text.isascii() and text.isdigit() else text
