"""Training as a service: in a worker, a training request and its data in, a
registered MLflow model version out; for ``forge predict``, a version loaded back.

``fit`` runs the trainer under the request's deadline inside an MLflow run (params,
a metric point per epoch, the model as an MLflow model the run logged), ``register``
makes that LoggedModel a new version of the model in MLflow's model registry, tagged
with the request's id, and ``registered`` finds that version again, so a redelivered
request is answered without training twice. ``load`` reads a version's Forge files
straight out of its MLflow model, as it read versions registered before.

The trainers (torch, scikit-learn: seconds to import) load on first use, not when a
worker starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from forge.embedding.model_cache import ModelCache
from forge.errors import PermanentError
from forge.events import ModelVersion, TrainingProgress, TrainingRequest
from forge.settings import Settings
from forge.training import artifacts
from forge.training.admission import AdmissionObserver, GpuAdmission
from forge.training.base import (
    Dataset,
    Deadline,
    EpochReport,
    TrainedModel,
    Trainer,
    TrainingTimeout,
)
from forge.training.promotion import apply_policy
from forge.training.tracking import TrainingRun, connect, kill_stale_runs
from forge.training.versions import (
    TAG_COLLECTION,
    TAG_EMBEDDING_MODEL,
    TAG_PARAMS,
    TAG_PRIMARY_METRIC,
    TAG_REQUEST_ID,
    TAG_STREAM,
    TAG_TASK,
    ModelVersions,
    VersionInfo,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from forge.training.distributed import Ranks

log = structlog.get_logger(__name__)

ProgressFn = Callable[[TrainingProgress], None]
# MLflow rejects longer tag values; params that long are not kept for retraining.
_MAX_TAG_CHARS = 5000


@dataclass(frozen=True, slots=True)
class Fitted:
    """A trained model whose MLflow run is finished, not yet registered."""

    request: TrainingRequest
    model: TrainedModel
    run: TrainingRun
    tags: dict[str, str]


@dataclass(frozen=True, slots=True)
class Registered:
    """A registered version, the event announcing it and the request's result."""

    version: VersionInfo
    event: ModelVersion
    result: dict[str, Any]


class TrainingService:
    def __init__(
        self,
        settings: Settings,
        client: MlflowClient,
        models: ModelCache,
        progress: ProgressFn | None = None,
        admission: GpuAdmission | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.versions = ModelVersions(client)
        self.models = models
        self.progress = progress
        self.admission = admission or GpuAdmission(settings)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        models: ModelCache | None = None,
        progress: ProgressFn | None = None,
        admission: GpuAdmission | None = None,
    ) -> TrainingService:
        models = models or ModelCache.from_settings(settings)
        return cls(settings, connect(settings), models, progress, admission)

    # ------------------------------------------------------------------ requests

    def registered(self, request: TrainingRequest) -> Registered | None:
        """The version an earlier delivery of ``request`` registered, if any. A delivery
        that died between registering and aliasing gets its aliases now."""
        version = self.versions.find_by_request(request.model, request.id)
        if version is None:
            return None
        latest = self.versions.latest(request.model)
        if not version.aliases and latest is not None and latest.version == version.version:
            version = apply_policy(self.versions, version, request.promote)
        log.info(
            "training request already registered", model=request.model, version=version.version
        )
        return self._registered(version)

    def fit(
        self,
        request: TrainingRequest,
        data: Dataset,
        *,
        stream: str = "",
        embedding_model: str | None = None,
        redelivery: bool = False,
        admission: AdmissionObserver | None = None,
    ) -> Fitted:
        """Train inside an MLflow run; the run is marked failed if training fails. On a
        redelivery, runs an earlier delivery left unfinished are marked killed. A task
        that can use a GPU waits for GPU admission first, before its run starts
        (``admission`` hears of the wait)."""
        from forge.training import exports
        from forge.training.tasks import get_trainer, parse_params

        trainer = get_trainer(request.task)
        params = parse_params(trainer, request.params)
        exports.check_exportable(request.task, list(request.export))
        warm_start = self._warm_start(request)
        if redelivery and kill_stale_runs(self.client, request.model, request.id):
            log.info("marked runs of an earlier delivery killed", request_id=request.id)
        tags = request_tags(request, stream, embedding_model)
        run_params = {**msgspec.to_builtins(params), "rows": len(data)}
        if request.warm_start_from:
            run_params["warm_start_from"] = request.warm_start_from
        need_bytes = trainer.gpu_memory_bytes(data, params)
        with self.admission.place(request.model, need_bytes, admission) as device:
            run = TrainingRun.start(self.client, request.model, tags, run_params)
            try:
                model = self.train_model(
                    request, data, trainer, params, warm_start, run.log_epoch, device=device
                )
                model, export_tags = with_exports(request, data, params, model)
                tags.update({TAG_PRIMARY_METRIC: model.primary_metric, **export_tags})
                run.finish(
                    model,
                    {TAG_PRIMARY_METRIC: model.primary_metric, **export_tags},
                    model_tags=tags,
                    embedding_model=embedding_model or None,
                )
            except BaseException as exc:
                run.fail(exc)
                raise
        return Fitted(request, model, run, tags)

    def register(self, fitted: Fitted) -> Registered:
        """Register the fitted model's LoggedModel as a new version and apply the
        promotion policy. Idempotent per request: a version the request already has is
        reused."""
        run = fitted.run
        return self.register_model(
            fitted.request, run.model_uri, run.run_id, run.model_id, fitted.tags
        )

    def register_model(
        self,
        request: TrainingRequest,
        model_uri: str,
        run_id: str,
        model_id: str | None,
        tags: dict[str, str],
        params: dict[str, Any] | None = None,
    ) -> Registered:
        """Register the model a run logged as ``request``'s version, with ``params``
        (default: the request's) kept for retraining; idempotent per request."""
        existing = self.versions.find_by_request(request.model, request.id)
        if existing is not None:  # a racing delivery got here first
            return self._registered(existing)
        tags = dict(tags)
        encoded = msgspec.json.encode(request.params if params is None else params).decode()
        if len(encoded) <= _MAX_TAG_CHARS:
            tags[TAG_PARAMS] = encoded
        version = self.versions.register(request.model, model_uri, run_id, tags, model_id)
        version = apply_policy(self.versions, version, request.promote)
        return self._registered(version)

    def train(
        self, request: TrainingRequest, data: Dataset, **kwargs: Any
    ) -> tuple[Fitted, Registered]:
        """``fit`` then ``register``: a request from data to version in one call."""
        fitted = self.fit(request, data, **kwargs)
        return fitted, self.register(fitted)

    # ------------------------------------------------------------------ training

    def train_model(
        self,
        request: TrainingRequest,
        data: Dataset,
        trainer: Trainer,
        params: msgspec.Struct,
        warm_start: TrainedModel | None,
        on_epoch: Callable[[EpochReport], None] | None = None,
        device: str | None = None,
        *,
        trial: int | None = None,
        after_epoch: Callable[[EpochReport], None] | None = None,
    ) -> TrainedModel:
        """The trainer alone under the request's deadline, with progress events: no
        MLflow. The per-request timeout never exceeds the configured one. ``device``:
        where GPU admission placed it (None: the trainer's choice).

        ``trial``: the search trial this training is (its progress says so);
        ``after_epoch`` may stop the training by raising (a pruned trial), where
        ``on_epoch`` is only told."""
        limit_s = min(
            request.timeout_s or self.settings.training_timeout_s, self.settings.training_timeout_s
        )
        deadline = Deadline.after(limit_s)

        def epoch_done(report: EpochReport) -> None:
            if on_epoch is not None:
                _best_effort(on_epoch, report, "could not log the epoch to MLflow")
            if self.progress is not None:
                event = _progress(request, report, trial)
                _best_effort(self.progress, event, "progress not published")
            if after_epoch is not None:
                after_epoch(report)

        try:
            if trial is None and (ranks := _ranks(request)) is not None:
                from forge.training import distributed

                return distributed.train(
                    data,
                    params,
                    ranks=ranks,
                    warm_start=warm_start,
                    on_epoch=epoch_done,
                    deadline=deadline,
                )
            return trainer.train(
                data,
                params,
                warm_start=warm_start,
                on_epoch=epoch_done,
                deadline=deadline,
                device=device,
            )
        except TrainingTimeout as exc:
            raise TrainingTimeout(
                f"training timed out: still running after {limit_s:g}s ({exc})"
            ) from None

    def load(self, model: str, ref: str | None = None) -> tuple[TrainedModel, VersionInfo]:
        """Version ``ref`` of ``model`` (default: champion, else latest), loaded through
        the byte-bounded model cache."""
        version = self.versions.resolve(model, ref)
        return self.load_version(version), version

    def load_version(self, version: VersionInfo) -> TrainedModel:
        """``version`` (resolved already), loaded through the byte-bounded model cache:
        a cache hit asks the registry nothing."""
        from forge.training.onnx_runtime import serving_model
        from forge.training.tasks import get_trainer

        trainer = get_trainer(version.task)
        key = f"trained:{self.client.tracking_uri}:{version.model}:{version.version}"

        def load() -> TrainedModel:
            files = artifacts.model_files(self._download(version))
            bound = self.settings.onnx_max_accuracy_delta
            return serving_model(trainer.load(files), files, bound)

        return self.models.get_or_load(key, load, lambda m: m.size_bytes)

    # ------------------------------------------------------------------ helpers

    def _warm_start(self, request: TrainingRequest) -> TrainedModel | None:
        if request.warm_start_from is None:
            return None
        from forge.training import exports

        served, version = self.load(request.model, request.warm_start_from)
        model = exports.unwrap(served)  # the torch model, where ONNX serves it
        if version.task != request.task:
            raise PermanentError(
                f"cannot warm-start a {request.task} model from version {version.version}"
                f" of {request.model!r}, a {version.task} model"
            )
        return model

    def _download(self, version: VersionInfo) -> Path:
        target = self.settings.cache_path / "models" / version.model / str(version.version)
        return artifacts.fetch(version.source, target, self.client.tracking_uri)

    def _registered(self, version: VersionInfo) -> Registered:
        metrics = self.versions.metrics(version)
        created = datetime.fromtimestamp(version.created_at_ms / 1000, UTC)
        event = ModelVersion(
            id=f"{version.model}:v{version.version}",
            created_at=created,
            model=version.model,
            model_version=version.version,
            run_id=version.run_id,
            source_id=version.request_id,
            metrics=metrics,
            aliases=version.aliases,
            artifact_uri=version.source,
        )
        result = {
            "model": version.model,
            "model_version": version.version,
            "run_id": version.run_id,
            "task": version.task,
            "aliases": version.aliases,
            "primary_metric": version.primary_metric,
            "metrics": metrics,
        }
        return Registered(version, event, result)


def request_tags(
    request: TrainingRequest, stream: str, embedding_model: str | None
) -> dict[str, str]:
    """The tags a request's run and version carry."""
    tags = {
        TAG_REQUEST_ID: request.id,
        TAG_STREAM: stream,
        TAG_TASK: request.task,
        TAG_COLLECTION: request.collection,
    }
    if embedding_model:
        tags[TAG_EMBEDDING_MODEL] = embedding_model
    return tags


def with_exports(
    request: TrainingRequest, data: Dataset, params: msgspec.Struct, model: TrainedModel
) -> tuple[TrainedModel, dict[str, str]]:
    """``model`` with the exports ``request`` asks for, measured on the validation split
    of ``data``, and the tags they add (none without exports)."""
    if not request.export:
        return model, {}
    from forge.training import exports  # torch: imported with the trainers, on first use

    validation, truth = exports.validation_rows(data, params)
    exported = exports.attach(model, validation, truth)  # "onnx" is the only format
    return exported, exported.tags()


def _ranks(request: TrainingRequest) -> Ranks | None:
    """The ranks the request's ``resources`` asks for; None: train in this process."""
    if request.resources is None:
        return None
    from forge.training.distributed import plan

    return plan(request.task, request.resources)


def _progress(
    request: TrainingRequest, report: EpochReport, trial: int | None = None
) -> TrainingProgress:
    which = "" if trial is None else f"trial-{trial}:"
    return TrainingProgress(
        id=f"{request.id}:{which}epoch-{report.epoch}",
        created_at=datetime.now(UTC),
        model=request.model,
        source_id=request.id,
        epoch=report.epoch,
        epochs=report.epochs,
        loss=report.loss,
        metric=report.metric,
        eta_s=report.eta_s,
        trial=trial,
    )


def _best_effort(fn: Callable[[Any], None], value: Any, message: str) -> None:
    """Progress reporting must never fail a training: log and carry on."""
    try:
        fn(value)
    except Exception as exc:
        log.warning(message, error=f"{type(exc).__name__}: {exc}")
