"""What MLflow runs for a Forge model version: ``mlflow.pyfunc.load_model`` and
``mlflow models serve`` load ``ForgeModel`` through the model's code file.

``load_context`` loads Forge's own files with the task's trainer (``Trainer.load``, as
``TrainingService.load`` does) and, for a model trained on embedded texts, the embedding
model recorded in the model's config. ``predict`` is ``TrainedModel.predict``: the same
labels and scores as ``forge predict``. Inputs arrive as MLflow's signature enforcement
leaves them (``forge.training.mlflow_model``): a float32 array for a raw-vector model, a
DataFrame of ``text`` and ``vector`` columns for a text model, or of the one column
``0`` when it was given a bare array, list or Series of texts.

Forge's own loading (``TrainingService.load``) never comes here: it reads the files of
the ``forge_model`` artifact itself, without MLflow's pyfunc.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped]  # no stubs installed
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.model import PythonModel, PythonModelContext

from forge.embedding.model import Embedder
from forge.errors import PermanentError
from forge.settings import Settings
from forge.training.artifacts import MODEL_ARTIFACT
from forge.training.base import TrainedModel, Vectors
from forge.training.mlflow_model import BARE_COLUMN
from forge.training.tasks import get_trainer

TEXT_COLUMN = "text"
VECTOR_COLUMN = "vector"


class ForgeModel(PythonModel):
    """A Forge model version as an MLflow pyfunc."""

    def __init__(self) -> None:
        self._model: TrainedModel | None = None
        self._embedder: Embedder | None = None
        self._batch_size = Settings().max_batch_size

    def load_context(self, context: PythonModelContext) -> None:
        config = context.model_config or {}
        trainer = get_trainer(str(config["task"]))
        self._model = trainer.load(Path(context.artifacts[MODEL_ARTIFACT]))
        name = config.get("embedding_model")
        if name:
            # Settings from the environment, as a Forge worker reads them: where models
            # are cached, how many texts go to the model at once.
            settings = Settings.from_env()
            self._batch_size = settings.max_batch_size
            self._embedder = Embedder.from_settings(settings, str(name))

    # The annotation is one MLflow infers no schema from, so the logged signature
    # stands; what arrives is a DataFrame or, for a tensor signature, an array.
    def predict(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        if self._model is None:
            raise MlflowException("the model is not loaded: load_context was not called")
        vectors = self._vectors(model_input, self._model.input_dim)
        try:
            predictions = self._model.predict(vectors)
        except PermanentError as exc:  # a wrong dimension: the caller's input
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return pd.DataFrame(
            {
                "label": pd.Series([p.label for p in predictions], dtype=object),
                "score": pd.Series([p.score for p in predictions], dtype=np.float64),
            }
        )

    def _vectors(self, model_input: Any, dim: int) -> Vectors:
        if isinstance(model_input, pd.DataFrame):
            if {TEXT_COLUMN, VECTOR_COLUMN} & set(model_input.columns):
                return self._rows(model_input, dim)
            if self._embedder is not None and BARE_COLUMN in model_input.columns:
                return self._bare_texts(model_input[BARE_COLUMN].tolist(), dim)
            if model_input.shape[1] == 0:
                raise MlflowException.invalid_parameter_value(
                    f"expected a DataFrame with a {TEXT_COLUMN!r} or {VECTOR_COLUMN!r} column"
                    " (this model's signature takes columns, not a bare array)"
                )
            by_dimension: Vectors = model_input.to_numpy(dtype=np.float32)
            return by_dimension
        if _holds_texts(model_input):  # called without MLflow's enforcement
            return self._bare_texts(list(model_input), dim)
        # A copy: MLflow may hand over a read-only array, which torch warns about.
        return np.array(model_input, dtype=np.float32)

    def _bare_texts(self, values: list[Any], dim: int) -> Vectors:
        """A bare array or list's rows, each of them a text."""
        for index, value in enumerate(values):
            if _missing(value):  # None, which pandas made NaN
                raise MlflowException.invalid_parameter_value(
                    f"row {index}: no text (a bare array or list holds one text per row)"
                )
            if not isinstance(value, str):
                raise MlflowException.invalid_parameter_value(
                    f"row {index}: a bare array or list holds one text per row, got"
                    f" {type(value).__name__} (give vectors as a {VECTOR_COLUMN!r} column)"
                )
        return self._rows(pd.DataFrame({TEXT_COLUMN: values}), dim)

    def _rows(self, frame: pd.DataFrame, dim: int) -> Vectors:
        """Each row's vector: its ``vector``, or its ``text`` embedded."""
        frame = _unfold_texts(frame)
        texts = _column(frame, TEXT_COLUMN)
        given = _column(frame, VECTOR_COLUMN)
        rows: list[npt.NDArray[np.float32] | None] = []
        to_embed: list[tuple[int, str]] = []
        for index, (text, vector) in enumerate(zip(texts, given, strict=True)):
            if (text is None) == (vector is None):
                raise MlflowException.invalid_parameter_value(
                    f"row {index}: give exactly one of {TEXT_COLUMN!r} and {VECTOR_COLUMN!r}"
                )
            if vector is not None:
                rows.append(_vector(index, vector))
            elif isinstance(text, str):
                rows.append(None)
                to_embed.append((index, text))
            else:
                raise MlflowException.invalid_parameter_value(
                    f"row {index}: {TEXT_COLUMN!r} must be one string per row,"
                    f" got {type(text).__name__}"
                )
        if to_embed:
            encoded = self._embed([text for _, text in to_embed])
            for (index, _), row in zip(to_embed, encoded, strict=True):
                rows[index] = row
        return _stack(rows, dim)

    def _embed(self, texts: list[str]) -> Vectors:
        if self._embedder is None:
            raise MlflowException.invalid_parameter_value(
                "this model was trained on raw vectors, not embedded texts: give vectors"
            )
        return self._embedder.encode(texts, self._batch_size)


def _holds_texts(value: Any) -> bool:
    """A list or 1-D array whose first item is a string."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and len(value) > 0 and isinstance(value[0], str)
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], str)


def _unfold_texts(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per text where MLflow made one row of them all: it reads the columnar
    ``{"inputs": {"text": [...]}}`` (and ``instances`` records) that way."""
    if len(frame) != 1 or TEXT_COLUMN not in frame.columns:
        return frame
    texts = frame[TEXT_COLUMN].iloc[0]
    vector = frame[VECTOR_COLUMN].iloc[0] if VECTOR_COLUMN in frame.columns else None
    if isinstance(texts, list | np.ndarray) and _missing(vector):
        return pd.DataFrame({TEXT_COLUMN: list(texts)})
    return frame


def _column(frame: pd.DataFrame, name: str) -> list[Any]:
    if name not in frame.columns:
        return [None] * len(frame)
    return [None if _missing(v) else v for v in frame[name].tolist()]


def _missing(value: Any) -> bool:
    """None, NaN or pandas' NA: what a frame holds where a row gave no value."""
    if value is None:
        return True
    if isinstance(value, str | list | np.ndarray):
        return False
    return bool(pd.isna(value))


def _vector(index: int, value: Any) -> npt.NDArray[np.float32]:
    vector = np.asarray(value, dtype=np.float32)
    if vector.ndim != 1:
        raise MlflowException.invalid_parameter_value(
            f"row {index}: {VECTOR_COLUMN!r} must be one vector per row, got shape {vector.shape}"
        )
    return vector


def _stack(rows: list[npt.NDArray[np.float32] | None], dim: int) -> Vectors:
    found = [row for row in rows if row is not None]
    if len(found) != len(rows):
        raise MlflowException("internal error: a row was left without a vector")
    if not found:
        return np.zeros((0, dim), dtype=np.float32)
    if len({row.shape for row in found}) > 1:
        raise MlflowException.invalid_parameter_value("every vector must have one dimension")
    return np.stack(found).astype(np.float32, copy=False)
