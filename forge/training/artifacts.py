"""Local copies of registered models' files, downloaded once per version, and where
Forge's own files lie in them.

A version's artifacts never change, so a complete copy is reused as is. Copies are
downloaded beside their final place and renamed into it, so a reader never sees a
half-downloaded model, and two processes fetching one version both end up with a
complete copy.

A version is an MLflow model (``MLmodel`` at its root) whose pyfunc artifact
``forge_model`` holds the files ``TrainedModel.save`` wrote; versions registered before
Forge logged MLflow models are those files alone. Forge loads them directly, without
MLflow's pyfunc machinery (the model's code file, schema enforcement, DataFrames).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from forge.errors import PermanentError

MLMODEL_FILE = "MLmodel"
# The pyfunc artifact holding Forge's files: ``artifacts/forge_model`` in the model.
MODEL_ARTIFACT = "forge_model"


def fetch(artifact_uri: str, target: Path, tracking_uri: str) -> Path:
    """The directory ``artifact_uri`` as a local folder at ``target``."""
    if target.is_dir():
        return target
    # MLflow draws a tqdm bar on stderr for every download: noise in `forge predict`
    # and in worker logs. It reads this variable when it downloads, not at import.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow.artifacts

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri, dst_path=str(staging), tracking_uri=tracking_uri
        )
        try:
            os.replace(local, target)
        except OSError:
            if not target.is_dir():  # not a racing download that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_files(directory: Path) -> Path:
    """The folder of Forge's files in a downloaded version: the MLflow model's
    ``forge_model`` artifact, or the version's own folder in the layout before."""
    mlmodel = directory / MLMODEL_FILE
    if not mlmodel.is_file():
        return directory
    import yaml  # type: ignore[import-untyped]  # PyYAML ships no stubs

    try:
        config: Any = yaml.safe_load(mlmodel.read_text())
        relative = config["flavors"]["python_function"]["artifacts"][MODEL_ARTIFACT]["path"]
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise PermanentError(f"{mlmodel} names no {MODEL_ARTIFACT!r} artifact ({exc})") from None
    return directory / str(relative)
