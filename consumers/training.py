"""The training-request handler: a collection's rows in, a registered model version out.

One request at a time (its spec asks for batches of one). Idempotency first: a
request whose version is already registered (an earlier delivery died before the
runtime settled it) is answered from the registry, never trained again. The
``model-version`` event travels in ``Succeeded.publish``, so the runtime publishes it
in the transaction that acks the request: exactly one per version, whichever
delivery gets there.

A request with ``promote: on-significance`` also puts the model's route under that
policy (``forge.serving.experiment.enroll``: the candidate shadows the champion when
the route has neither split nor shadow), on every delivery: putting it is idempotent.

Requests that cannot be done (unknown task or parameter, missing collection, too few
labelled rows, timeout) raise ``PermanentError``: a ``failed`` completion, no retries.

A training that waits for GPU memory (``forge.training.admission``) says so in the
metrics and in a short-lived key per entry (``Keys.admission_wait``) that
``forge status`` and ``forge watch`` read; several run at once with
``FORGE_TRAINING_CONCURRENCY`` (the handler is called from that many threads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import redis
import structlog

from consumers.datasets import load_dataset
from consumers.once import Once
from consumers.tuning import fan_out_trials
from forge.errors import PermanentError
from forge.events import TrainingProgress, TrainingRequest
from forge.runtime.context import Context
from forge.runtime.handlers import Message, Outcome, Succeeded
from forge.serving.experiment import enroll
from forge.serving.routing import RouteStore
from forge.training.admission import AdmissionWait
from forge.training.base import Dataset
from forge.training.service import Registered, TrainingService
from forge.training.versions import CANDIDATE
from forge.vectorstore import VectorStore

if TYPE_CHECKING:
    from forge.training.tuning.search import TuneService

log = structlog.get_logger(__name__)

CLUSTERING = "clustering"
ON_SIGNIFICANCE = "on-significance"


def cluster_field(model: str) -> str:
    """The metadata key a clustering model's assignments are written to."""
    return f"{model}_cluster"


class TrainingHandler:
    def __init__(
        self,
        ctx: Context,
        store: Once[VectorStore],
        service: Once[TrainingService],
        tuner: Once[TuneService] | None = None,
    ) -> None:
        self.ctx = ctx
        # All opened on first use: a worker that never trains never connects to
        # PostgreSQL or MLflow for it.
        self.store = store
        self.service = service
        self.tuner = tuner
        self.routes = RouteStore(ctx.redis, ctx.keys)

    def __call__(self, messages: Sequence[Message[TrainingRequest]]) -> list[Outcome]:
        # A PermanentError raised here fails only its own request: with batches of one
        # the runtime turns it into that request's failed completion.
        return [self.handle(message) for message in messages]

    def handle(self, message: Message[TrainingRequest]) -> Outcome:
        request = message.event
        _, lane = self.ctx.keys.lane_of(message.stream)
        if request.priority != lane:
            # The lane decided when it ran; say so, for producers that XADD themselves.
            log.warning(
                "training request's priority differs from its lane; the lane decides",
                request_id=request.id,
                priority=request.priority,
                lane=lane,
                stream=message.stream,
            )
        service = self.service()
        done = service.registered(request)
        if done is None:
            done = self._tune(message) if request.tune else self._train(message)
        elif request.tune and message.is_redelivery and done.version.task == CLUSTERING:
            # The delivery that registered it may have died before writing these.
            data, _ = load_dataset(self.store(), request)
            self._write_best_clusters(request, done, data)
        if request.promote == ON_SIGNIFICANCE:
            enroll(self.routes, request.model, shadow_candidate=CANDIDATE in done.version.aliases)
        result = dict(done.result)
        if done.version.task == CLUSTERING:
            result["cluster_field"] = cluster_field(request.model)
        if request.tune:
            result["tune"] = self._tuner().summary(request)
        publish = ((self.ctx.keys.model_versions, done.event),)
        return Succeeded(result, publish=publish)

    def _train(self, message: Message[TrainingRequest]) -> Registered:
        from forge.training.tasks import get_trainer, parse_params

        request, service = message.event, self.service()
        # Validate before loading data: a typo should not cost a collection scan.
        parse_params(get_trainer(request.task), request.params)
        data, embedding_model = load_dataset(self.store(), request)
        with AdmissionReport(self.ctx, message) as admission:
            fitted = service.fit(
                request,
                data,
                stream=message.stream,
                embedding_model=embedding_model,
                redelivery=message.is_redelivery,
                admission=admission,
            )
        self._write_assignments(request, getattr(fitted.model, "assignments", None))
        return service.register(fitted)

    def _tune(self, message: Message[TrainingRequest]) -> Registered:
        """Search the hyperparameters (see ``forge.training.tuning.search``); a
        clustering version's assignments come from the best trial's model."""
        request, tuner = message.event, self._tuner()
        tuner.plan(request)  # a bad space fails before the collection is read
        data, embedding_model = load_dataset(self.store(), request)
        done = tuner.search(
            request,
            data,
            fan_out_trials(self.ctx, request),
            stream=message.stream,
            embedding_model=embedding_model,
        )
        if request.task == CLUSTERING:
            self._write_best_clusters(request, done, data)
        return done

    def _write_best_clusters(
        self, request: TrainingRequest, done: Registered, data: Dataset
    ) -> None:
        """A clustering search's assignments: each row's nearest centre of the version
        (the best trial's model, loaded back: trials keep no assignments)."""
        model, _ = self.service().load(request.model, str(done.version.version))
        clusters = [int(p.label.rpartition("-")[2]) for p in model.predict(data.vectors)]
        self._write_assignments(request, dict(zip(data.ids, clusters, strict=True)))

    def _tuner(self) -> TuneService:
        if self.tuner is None:
            raise PermanentError("this worker runs no hyperparameter searches")
        return self.tuner()

    def _write_assignments(
        self, request: TrainingRequest, assignments: dict[str, int] | None
    ) -> None:
        """Write a clustering model's cluster per row back into the rows' metadata,
        before registering: a redelivery that finds the version skips this step."""
        if not assignments:
            return
        key = cluster_field(request.model)
        patches = {record_id: {key: cluster} for record_id, cluster in assignments.items()}
        patched = self.store().update_metadata(request.collection, patches)
        log.info("cluster assignments written", collection=request.collection, rows=patched)


class AdmissionWaitRecord(msgspec.Struct, kw_only=True):
    """What ``Keys.admission_wait`` holds while a training waits for GPU memory."""

    model: str
    need_bytes: int
    free_bytes: int
    headroom_bytes: int
    gpus: int
    since_s: float
    worker: str


class AdmissionReport:
    """One training's GPU admission, told to the metrics and to ``forge status``."""

    def __init__(self, ctx: Context, message: Message[TrainingRequest]) -> None:
        self._ctx = ctx
        self._key = ctx.keys.admission_wait(message.stream, message.entry_id)
        # Outlives a poll or two, so a dead worker's record soon disappears.
        self._ttl_s = max(math.ceil(3 * ctx.settings.gpu_admission_poll_s), 30)
        self._waiting_model: str | None = None

    def waiting(self, wait: AdmissionWait) -> None:
        metrics = self._ctx.metrics.training_queue
        metrics.admission_waits_total.labels(model=wait.model).inc()
        if self._waiting_model is None:
            self._waiting_model = wait.model
            metrics.admission_waiting.labels(model=wait.model).inc()
        record = AdmissionWaitRecord(
            model=wait.model,
            need_bytes=wait.need_bytes,
            free_bytes=wait.free_bytes,
            headroom_bytes=wait.headroom_bytes,
            gpus=wait.gpus,
            since_s=wait.since_s,
            worker=self._ctx.consumer,
        )
        self._write(lambda r: r.set(self._key, msgspec.json.encode(record), ex=self._ttl_s))

    def admitted(self, model: str, device: str, waited_s: float) -> None:
        if device == "cpu":
            self._ctx.metrics.training_queue.cpu_fallbacks_total.labels(model=model).inc()
        self._stop_waiting()

    def __enter__(self) -> AdmissionReport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # A training that fails while it waits (NVML gone, the worker killed) is no
        # longer waiting either.
        self._stop_waiting()

    def _stop_waiting(self) -> None:
        if self._waiting_model is not None:
            gauge = self._ctx.metrics.training_queue.admission_waiting
            gauge.labels(model=self._waiting_model).dec()
            self._waiting_model = None
            self._write(lambda r: r.delete(self._key))

    def _write(self, command: Callable[[redis.Redis], Any]) -> None:
        """The record is a view for operators: a failure to write it must not fail the
        training, but it is logged and counted."""
        try:
            command(self._ctx.redis)
        except redis.RedisError as exc:
            self._ctx.metrics.infrastructure_errors_total.labels(component="redis").inc()
            log.warning("admission wait not recorded", error=f"{type(exc).__name__}: {exc}")


def progress_publisher(ctx: Context) -> Callable[[TrainingProgress], Any]:
    """Publishes training curves to the (trimmed) progress stream: best effort, live
    data for dashboards, so not part of any transaction."""
    stream = ctx.keys.training_progress

    def publish(event: TrainingProgress) -> None:
        ctx.metrics.training_progress_ratio.labels(model=event.model).set(
            event.epoch / max(event.epochs, 1)
        )
        ctx.metrics.training_loss.labels(model=event.model).set(event.loss)
        ctx.publish(stream, event)

    return publish
