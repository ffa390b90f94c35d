"""``forge models upgrade``: versions registered before Forge logged MLflow models
become MLflow models in place, keeping their numbers, sources and aliases.

Such a version's source is the ``model`` folder of its run's artifacts, holding Forge's
files alone. MLflow lets a client write artifacts into a finished run, so the upgrade
writes an MLflow model (``mlflow_model.save_pyfunc``, its ``forge_model`` artifact a
copy of those files) into that same folder, and ``models:/NAME@ALIAS`` loads as before,
now through MLflow too. ``MLmodel`` goes up last: an upgrade cut short is done again
in full by the next run, and a version whose source holds an ``MLmodel`` is left
alone, so a second run changes nothing. These versions get no LoggedModel: a
version's source cannot change, and a LoggedModel keeps its files apart.

A version tagged with an embedding model whose dimension is not the model's was
trained on ready vectors (before collections of them stopped passing for embedded
ones): it is upgraded as a raw-vector model and loses the tag.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from forge.errors import PermanentError
from forge.settings import Settings
from forge.training.artifacts import MLMODEL_FILE, MODEL_ARTIFACT
from forge.training.base import TrainedModel
from forge.training.mlflow_model import PYFUNC_CODE
from forge.training.versions import TAG_EMBEDDING_MODEL, ModelVersions, VersionInfo

log = structlog.get_logger(__name__)

Action = Literal["upgraded", "would upgrade", "unchanged", "skipped"]
# Files an MLflow model adds beside Forge's, at the root of an upgraded source.
_MLFLOW_FILES = {
    MLMODEL_FILE,
    "conda.yaml",
    "python_env.yaml",
    "requirements.txt",
    "input_example.json",
    "serving_input_example.json",
    "registered_model_meta",
    PYFUNC_CODE.name,
}


@dataclass(frozen=True, slots=True)
class Upgrade:
    """What ``upgrade`` did (or, in a dry run, would do) to one version."""

    model: str
    version: int
    action: Action
    detail: str


def upgrade(
    versions: ModelVersions, settings: Settings, model: str | None, *, dry_run: bool
) -> list[Upgrade]:
    """Upgrade every version of ``model`` (default: of every Forge model), oldest
    first; ``ModelNotFound`` for an unknown model."""
    upgrader = _Upgrader(versions, settings)
    done: list[Upgrade] = []
    for name in [model] if model else versions.models():
        for version in sorted(versions.all(name), key=lambda v: v.version):
            done.append(upgrader.one(version, dry_run=dry_run))
    return done


class _Upgrader:
    def __init__(self, versions: ModelVersions, settings: Settings) -> None:
        self.versions = versions
        self.client = versions.client
        self.settings = settings
        self._dimensions: dict[str, int] = {}

    def one(self, version: VersionInfo, *, dry_run: bool) -> Upgrade:
        def result(action: Action, detail: str) -> Upgrade:
            return Upgrade(version.model, version.version, action, detail)

        if self._has_mlmodel(version.source):
            return result("unchanged", "already an MLflow model")
        path = self._path_in_run(version)
        if path is None:
            return result("skipped", f"its source {version.source} is not in its run's artifacts")
        if dry_run:
            return result("would upgrade", f"add an MLflow model to {version.source}")
        return result("upgraded", self._write(version, path))

    def _has_mlmodel(self, source: str) -> bool:
        import mlflow.artifacts

        listed = mlflow.artifacts.list_artifacts(
            artifact_uri=source, tracking_uri=self.client.tracking_uri
        )
        return any(Path(f.path).name == MLMODEL_FILE and not f.is_dir for f in listed)

    def _path_in_run(self, version: VersionInfo) -> str | None:
        """The source's path inside its run's artifacts, if it is there."""
        if not version.run_id:
            return None
        root = str(self.client.get_run(version.run_id).info.artifact_uri).rstrip("/")
        if not version.source.startswith(f"{root}/"):
            return None
        return version.source[len(root) + 1 :].strip("/") or None

    def _write(self, version: VersionInfo, path: str) -> str:
        """Write the MLflow model into the source; what was done, in words."""
        from mlflow.models import Model

        from forge.training.mlflow_model import save_pyfunc
        from forge.training.tasks import get_trainer

        with tempfile.TemporaryDirectory(prefix="forge-upgrade-") as tmp:
            files = self._forge_files(version, Path(tmp))
            trained = get_trainer(version.task).load(files)
            embedding_model, detail = self._embedding_model(version, trained)
            staged = Path(tmp) / "mlflow-model"
            described = Model(run_id=version.run_id, artifact_path=path)
            save_pyfunc(staged, files, trained, embedding_model, described)
            mlmodel = Path(tmp) / MLMODEL_FILE
            (staged / MLMODEL_FILE).rename(mlmodel)
            self.client.log_artifacts(version.run_id, str(staged), path)
            self.client.log_artifact(version.run_id, str(mlmodel), path)
        log.info("model version upgraded", model=version.model, version=version.version)
        return detail

    def _forge_files(self, version: VersionInfo, tmp: Path) -> Path:
        """Forge's files of the source, in ``tmp/forge_model``: the files at its root,
        leaving out what an upgrade cut short may have added."""
        import mlflow.artifacts

        local = mlflow.artifacts.download_artifacts(
            artifact_uri=version.source,
            dst_path=str(tmp / "download"),
            tracking_uri=self.client.tracking_uri,
        )
        files = tmp / MODEL_ARTIFACT
        files.mkdir()
        for item in Path(local).iterdir():
            if item.is_file() and item.name not in _MLFLOW_FILES:
                shutil.copy2(item, files / item.name)
        return files

    def _embedding_model(
        self, version: VersionInfo, trained: TrainedModel
    ) -> tuple[str | None, str]:
        name = version.embedding_model
        if name is None:
            return None, "MLflow model added (vectors)"
        dimension = self._dimension(name, version)
        if dimension == trained.input_dim:
            return name, f"MLflow model added (texts with {name}, or vectors)"
        self.client.delete_model_version_tag(
            version.model, str(version.version), TAG_EMBEDDING_MODEL
        )
        return None, (
            f"MLflow model added (vectors); tag {TAG_EMBEDDING_MODEL} dropped: {name} makes"
            f" {dimension}-d vectors, the model takes {trained.input_dim}-d ones"
        )

    def _dimension(self, name: str, version: VersionInfo) -> int:
        if name not in self._dimensions:
            from forge.embedding.model import Embedder

            try:
                self._dimensions[name] = Embedder.from_settings(self.settings, name).dimension
            except (OSError, ValueError) as exc:
                raise PermanentError(
                    f"cannot load embedding model {name!r} of {version.model}"
                    f" version {version.version}: {exc}"
                ) from None
        return self._dimensions[name]
