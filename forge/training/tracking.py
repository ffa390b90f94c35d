"""MLflow tracking: where runs live, and one run per training.

The tracking URI is ``settings.mlflow_tracking_uri`` (``MLRUN_DBPATH`` or
``MLFLOW_TRACKING_URI``) or, when unset, an embedded SQLite store under
``<home_dir>/mlflow``: no server to run, and SQLite's transactions keep the model
registry consistent where MLflow's file store would not. Runs of a local SQLite store
keep their artifacts in an ``artifacts`` folder beside the database (MLflow would
otherwise pick ``./mlruns`` under whatever directory the worker started in); a
tracking server chooses its own artifact store. A local store is created, or upgraded
to the installed MLflow's schema, by one process at a time (``sqlite_store``).

mlflow is imported on first use: it costs about a second, which commands and workers
that never train should not pay.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import structlog

from forge.settings import Settings
from forge.training import sqlite_store
from forge.training.base import EpochReport, TrainedModel

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

log = structlog.get_logger(__name__)
MLFLOW_DIR = "mlflow"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
EPOCH_FLUSH_INTERVAL_S = 5.0
# MLflow caps a param value at 6000 characters; longer ones are cut, not rejected.
_MAX_PARAM_CHARS = 6000
_QUIET_LOGGERS = ("mlflow", "alembic", "sqlalchemy")
_UNNAMED_CHECK_WARNING = "Unnamed CHECK constraint on reflected table"
# Values that can go into a filter string as they are; MLflow's filter grammar has no
# documented escape for quotes, so others are matched in Python or not at all.
_FILTER_SAFE = re.compile(r"[A-Za-z0-9_:.@/+\-]+")


def filter_safe(value: str) -> bool:
    return _FILTER_SAFE.fullmatch(value) is not None


def tracking_uri(settings: Settings) -> str:
    if settings.mlflow_tracking_uri:
        return settings.mlflow_tracking_uri
    return f"sqlite:///{(settings.home_dir / MLFLOW_DIR / DB_FILE).resolve()}"


def sqlite_database(uri: str) -> Path | None:
    """The file of a local SQLite store; ``None`` for a tracking server."""
    parts = urlsplit(uri)
    if parts.scheme != "sqlite" or not parts.path or parts.path in {"/", "/:memory:"}:
        return None
    # sqlite:////abs/path.db has path "//abs/path.db"; sqlite:///rel.db has "/rel.db".
    return Path(unquote(parts.path[1:])).resolve()


def artifact_root(uri: str) -> Path | None:
    """Where a local SQLite store's artifacts go; ``None`` for a tracking server."""
    database = sqlite_database(uri)
    return None if database is None else database.parent / ARTIFACTS_DIR


def experiment_name(model: str) -> str:
    return f"forge/{model}"


def quiet_mlflow() -> None:
    """MLflow logs schema migrations and every artifact upload at INFO: Forge's own
    logs say what matters. After importing mlflow, which sets its loggers' levels.

    Alembic warns about each unnamed CHECK constraint of a SQLite table that an MLflow
    migration rebuilds: MLflow's own schema, nothing a user can act on."""
    import mlflow  # noqa: F401

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore", message=_UNNAMED_CHECK_WARNING, category=UserWarning, module=r"alembic\."
    )


def connect(settings: Settings) -> MlflowClient:
    """A client for runs and the model registry at the configured (or embedded) store."""
    quiet_mlflow()
    from mlflow import MlflowClient

    uri = tracking_uri(settings)
    database = sqlite_database(uri)
    if database is not None:
        sqlite_store.prepare(uri, database, database.parent / ARTIFACTS_DIR)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient, model: str) -> str:
    """The model's experiment (``forge/<model>``), created on first use."""
    from mlflow.exceptions import MlflowException

    name = experiment_name(model)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    root = artifact_root(client.tracking_uri)
    location = (root / model).as_uri() if root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        # Another worker created it between our lookup and create.
        raced = client.get_experiment_by_name(name)
        if raced is None:
            raise
        return str(raced.experiment_id)


def kill_stale_runs(client: MlflowClient, model: str, request_id: str) -> int:
    """Mark runs of ``request_id`` still RUNNING as KILLED: their worker died (this is a
    redelivery), so nothing will finish them. Returns how many there were."""
    found = client.get_experiment_by_name(experiment_name(model))
    if found is None or not filter_safe(request_id):
        return 0
    query = f"tags.`forge.request_id` = '{request_id}' and attributes.status = 'RUNNING'"
    stale = client.search_runs([str(found.experiment_id)], query)
    for run in stale:
        client.set_terminated(run.info.run_id, "KILLED")
    return len(stale)


class TrainingRun:
    """One MLflow run: parameters and tags up front, a metric point per epoch, then the
    final metrics and the model as an MLflow model (a LoggedModel of the run), or a
    failure."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        artifact_uri: str,
        experiment_id: str = "",
        params: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.artifact_uri = artifact_uri
        self.experiment_id = experiment_id
        self.params = params or {}
        # Set by ``finish``: the LoggedModel holding the model, and where its files are.
        self.model_id: str | None = None
        self.model_uri = ""
        self._pending: list[Metric] = []
        self._flushed_s = time.monotonic()

    @classmethod
    def start(
        cls, client: MlflowClient, model: str, tags: dict[str, str], params: dict[str, Any]
    ) -> TrainingRun:
        from mlflow.entities import Param

        experiment = experiment_id(client, model)
        run = client.create_run(experiment, tags=tags)
        flat = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        if flat:
            client.log_batch(run.info.run_id, params=flat)
        logged = {p.key: p.value for p in flat}
        return cls(client, run.info.run_id, str(run.info.artifact_uri), experiment, logged)

    def log_epoch(self, report: EpochReport) -> None:
        """Buffer the epoch's points and write them at most every few seconds: one
        store write (a SQLite commit, an HTTP call) per epoch would slow short epochs
        down, and live curves have the progress stream."""
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self._pending.append(Metric("epoch_loss", report.loss, now_ms, report.epoch))
        if report.metric is not None:
            self._pending.append(Metric("epoch_val_metric", report.metric, now_ms, report.epoch))
        if time.monotonic() - self._flushed_s >= EPOCH_FLUSH_INTERVAL_S:
            self._flush()

    def finish(
        self,
        model: TrainedModel,
        tags: dict[str, str],
        *,
        model_tags: dict[str, str] | None = None,
        embedding_model: str | None = None,
    ) -> None:
        """Log the final metrics (on the run and its LoggedModel), ``tags`` and the
        model as an MLflow model (``forge.training.mlflow_model``), once every epoch
        point is written. ``embedding_model``: what made the training vectors, if a
        model did; the MLflow model then embeds texts with it."""
        from mlflow.entities import Metric, RunTag

        from forge.training import mlflow_model

        self._flush()
        if not self.experiment_id:
            self.experiment_id = str(self.client.get_run(self.run_id).info.experiment_id)
        logged = mlflow_model.create_logged_model(
            self.client,
            self.experiment_id,
            self.run_id,
            model.task,
            tags={**(model_tags or {}), **tags},
            params=self.params,
        )
        now_ms = int(time.time() * 1000)
        finals = [
            Metric(k, float(v), now_ms, 0, model_id=logged.model_id)
            for k, v in sorted(model.metrics.items())
        ]
        run_tags = [RunTag(k, v) for k, v in sorted(tags.items())]
        self.client.log_batch(self.run_id, metrics=finals, tags=run_tags)
        mlflow_model.log_pyfunc(self.client, logged, self.run_id, model, embedding_model)
        self.model_id, self.model_uri = logged.model_id, str(logged.artifact_location)
        self.client.set_terminated(self.run_id, "FINISHED")

    def stop(self, status: str, tags: dict[str, str]) -> None:
        """End the run early without a model (a pruned search trial): its epoch points
        are written first, then ``tags``, then MLflow ``status``."""
        from mlflow.entities import RunTag

        self._flush()
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in sorted(tags.items())])
        self.client.set_terminated(self.run_id, status)

    def fail(self, error: BaseException) -> None:
        """Mark the run failed with its reason; never raises (the caller has an error)."""
        try:
            self._flush()
            self.client.set_tag(self.run_id, "forge.error", f"{type(error).__name__}: {error}")
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception as exc:
            log.warning("could not mark the run failed", run_id=self.run_id, error=str(exc))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._flushed_s = time.monotonic()
        if pending:
            self.client.log_batch(self.run_id, metrics=pending)


def _param_value(value: Any) -> str:
    import msgspec

    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return text[:_MAX_PARAM_CHARS]
