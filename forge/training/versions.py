"""The MLflow model registry as Forge uses it.

One registered model per Forge model, one version per training request, tagged with
the request's id so a redelivered request finds the version it already made instead
of training again. Aliases, not the deprecated stages: ``champion`` is the version
that serves, ``candidate`` the newest version that did not (yet) become champion.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from forge.errors import PermanentError
from forge.training.tracking import filter_safe

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion as MlflowVersion

CHAMPION = "champion"
CANDIDATE = "candidate"
LATEST = "latest"

TAG_REQUEST_ID = "forge.request_id"
TAG_STREAM = "forge.event_stream"
TAG_TASK = "forge.task"
TAG_COLLECTION = "forge.collection"
TAG_EMBEDDING_MODEL = "forge.embedding_model"
TAG_PRIMARY_METRIC = "forge.primary_metric"
TAG_PARAMS = "forge.params"
# On registered models Forge created, so listings can leave others' models out.
TAG_MANAGED = "forge.managed"

_MODEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,62}")
_PAGE_SIZE = 1000


class ModelNotFound(PermanentError):
    """No such registered model, version or alias."""


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """A registered version with the tags Forge gave it and its current aliases."""

    model: str
    version: int
    run_id: str
    source: str
    tags: dict[str, str]
    aliases: list[str]
    created_at_ms: int

    @property
    def request_id(self) -> str:
        return self.tags.get(TAG_REQUEST_ID, "")

    @property
    def task(self) -> str:
        return self.tags.get(TAG_TASK, "")

    @property
    def collection(self) -> str:
        return self.tags.get(TAG_COLLECTION, "")

    @property
    def embedding_model(self) -> str | None:
        return self.tags.get(TAG_EMBEDDING_MODEL) or None

    @property
    def primary_metric(self) -> str:
        return self.tags.get(TAG_PRIMARY_METRIC, "")

    @property
    def params(self) -> dict[str, Any]:
        """The training request's ``params`` this version was trained with."""
        raw = self.tags.get(TAG_PARAMS)
        return dict(msgspec.json.decode(raw)) if raw else {}


class ModelVersions:
    """Forge's models and their versions in the MLflow model registry: lookups by
    request, number or alias, new versions and alias changes."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client

    # ------------------------------------------------------------------ lookups

    def find_by_request(self, model: str, request_id: str) -> VersionInfo | None:
        """The version a training request registered, if it got that far."""
        if filter_safe(request_id):
            query = f"{_by_name(model)} and tag.`{TAG_REQUEST_ID}` = '{request_id}'"
            found = list(self._search(query))
        else:
            found = [v for v in self._search(_by_name(model)) if _request(v) == request_id]
        if not found:
            return None
        return self._with_aliases(min(found, key=lambda v: int(v.version)))

    def get(self, model: str, version: int) -> VersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_model_version(model, str(version))
        except MlflowException as exc:
            raise ModelNotFound(f"model {model!r} has no version {version}") from exc
        return self._with_aliases(found)

    def latest(self, model: str) -> VersionInfo | None:
        newest = self.client.search_model_versions(
            _by_name(model), max_results=1, order_by=["version_number DESC"]
        )
        return self._with_aliases(newest[0]) if newest else None

    def resolve(self, model: str, ref: str | None = None) -> VersionInfo:
        """Version ``ref``: a number, an alias or ``latest``; by default the champion,
        else the latest version."""
        if ref is None:
            return self._alias(model, CHAMPION) or self._require_latest(model)
        if ref.isdigit():
            return self.get(model, int(ref))
        if ref == LATEST:
            return self._require_latest(model)
        found = self._alias(model, ref)
        if found is None:
            raise ModelNotFound(f"model {model!r} has no version {ref!r}")
        return found

    def all(self, model: str) -> list[VersionInfo]:
        """Every version of ``model``, newest first."""
        aliases = self.aliases(model)
        found = [_info(v, aliases) for v in self._search(_by_name(model))]
        return sorted(found, key=lambda v: v.version, reverse=True)

    def models(self) -> list[str]:
        """Registered models Forge created, by name."""
        names: list[str] = []
        token: str | None = None
        while True:
            page = self.client.search_registered_models(
                max_results=_PAGE_SIZE, page_token=token, order_by=["name ASC"]
            )
            names += [m.name for m in page if m.tags.get(TAG_MANAGED)]
            token = page.token
            if not token:
                return names

    def aliases(self, model: str) -> dict[str, int]:
        """Alias -> version of ``model``; ``ModelNotFound`` if there is no such model."""
        from mlflow.exceptions import MlflowException

        try:
            registered = self.client.get_registered_model(model)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise ModelNotFound(f"no model named {model!r}") from None
        return {alias: int(version) for alias, version in registered.aliases.items()}

    def metrics(self, version: VersionInfo) -> dict[str, float]:
        """The final metrics of the run that produced ``version``."""
        data = self.client.get_run(version.run_id).data
        return {k: float(v) for k, v in data.metrics.items() if not k.startswith("epoch_")}

    # ------------------------------------------------------------------ changes

    def register(
        self,
        model: str,
        source: str,
        run_id: str,
        tags: dict[str, str],
        model_id: str | None = None,
    ) -> VersionInfo:
        """A new version of ``model`` (created on first use) from ``source``, the
        artifact location of LoggedModel ``model_id`` of run ``run_id``.

        The source is that location, not ``models:/<model_id>``: a local SQL registry
        resolves such a URI with a client of the process-wide tracking URI, which may
        not be this client's. The LoggedModel lists the version, as
        ``mlflow.register_model`` would have it."""
        self._ensure_model(model)
        created = self.client.create_model_version(
            model, source, run_id=run_id, tags=tags, model_id=model_id
        )
        if model_id is not None:
            self._link(model_id, model, created.version)
        return self._with_aliases(created)

    def set_alias(self, model: str, alias: str, version: int) -> None:
        self.client.set_registered_model_alias(model, alias, str(version))

    def drop_alias(self, model: str, alias: str) -> None:
        self.client.delete_registered_model_alias(model, alias)

    # ------------------------------------------------------------------ helpers

    def _link(self, model_id: str, model: str, version: Any) -> None:
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        listed = self.client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
        entries: list[Any] = list(msgspec.json.decode(listed)) if listed else []
        entry = {"name": model, "version": version}
        if entry not in entries:
            entries.append(entry)
        value = msgspec.json.encode(entries).decode()
        self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: value})

    def _ensure_model(self, model: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.aliases(model)
            return  # a lookup: cheaper than an insert that fails on every later version
        except ModelNotFound:
            pass
        try:
            self.client.create_registered_model(model, tags={TAG_MANAGED: "true"})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _alias(self, model: str, alias: str) -> VersionInfo | None:
        version = self.aliases(model).get(alias)
        return None if version is None else self.get(model, version)

    def _require_latest(self, model: str) -> VersionInfo:
        self.aliases(model)  # says "no model named ..." for an unknown model
        found = self.latest(model)
        if found is None:
            raise ModelNotFound(f"model {model!r} has no versions")
        return found

    def _search(self, query: str) -> Iterator[MlflowVersion]:
        token: str | None = None
        while True:
            page = self.client.search_model_versions(
                query, max_results=_PAGE_SIZE, page_token=token
            )
            yield from page
            token = page.token
            if not token:
                return

    def _with_aliases(self, version: MlflowVersion) -> VersionInfo:
        # Search results leave ``aliases`` empty; the registered model has them all.
        return _info(version, self.aliases(str(version.name)))


def _by_name(model: str) -> str:
    """A filter on the model's name; Forge's names never need quoting (see ``Name``)."""
    if not _MODEL_NAME.fullmatch(model):
        raise ModelNotFound(f"no model named {model!r} (not a valid model name)")
    return f"name = '{model}'"


def _request(version: MlflowVersion) -> str:
    return str((version.tags or {}).get(TAG_REQUEST_ID, ""))


def _info(version: MlflowVersion, aliases: dict[str, int]) -> VersionInfo:
    number = int(version.version)
    return VersionInfo(
        model=str(version.name),
        version=number,
        run_id=str(version.run_id or ""),
        source=str(version.source or ""),
        tags={str(k): str(v) for k, v in (version.tags or {}).items()},
        aliases=sorted(a for a, v in aliases.items() if v == number),
        created_at_ms=int(version.creation_timestamp or 0),
    )
