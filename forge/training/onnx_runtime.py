"""Serving a classifier through ONNX Runtime: which of a version's exports to run, and
the model that runs it with the torch model's labels interface.

``choose`` takes the int8 export when its validation accuracy is within
``max_accuracy_delta`` of the torch model's (``FORGE_ONNX_MAX_ACCURACY_DELTA``), else
the float32 export when that one is, else the torch model: an export never serves
when it labels the validation split worse than the bound allows.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import structlog

from forge.errors import PermanentError
from forge.training import export_format
from forge.training.base import Prediction, TrainedModel, Vectors

if TYPE_CHECKING:
    import onnxruntime  # type: ignore[import-untyped]  # no stubs

log = structlog.get_logger(__name__)

_PREDICT_BATCH_ROWS = 8192


class OnnxClassifier:
    """A classifier version served by ONNX Runtime: the same ``predict`` (label and
    softmax probability per row) as the torch model it was exported from, which it
    keeps as ``original`` for everything but predicting (warm starts, saving)."""

    def __init__(
        self, original: TrainedModel, session: onnxruntime.InferenceSession, path: Path
    ) -> None:
        self.original = original
        self.session = session
        self.path = path
        self.labels: list[str] = list(getattr(original, "labels", []))
        self.runtime = path.name
        self.task = original.task
        self.metrics = original.metrics
        self.primary_metric = original.primary_metric

    @classmethod
    def open(cls, original: TrainedModel, path: Path) -> OnnxClassifier:
        import onnxruntime
        import torch

        options = onnxruntime.SessionOptions()
        # As many threads as torch uses here: the operator's one setting for both.
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        return cls(original, session, path)

    @property
    def input_dim(self) -> int:
        return self.original.input_dim

    @property
    def size_bytes(self) -> int:
        return self.original.size_bytes + self.path.stat().st_size

    def predict(self, vectors: Vectors) -> list[Prediction]:
        """The most probable label of each row and its softmax probability."""
        x = export_format.vectors_of(vectors)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise PermanentError(
                f"expected vectors of dimension {self.input_dim}, got shape {tuple(x.shape)}"
            )
        predictions: list[Prediction] = []
        for start in range(0, len(x), _PREDICT_BATCH_ROWS):
            chunk = x[start : start + _PREDICT_BATCH_ROWS]
            (logits,) = self.session.run(
                [export_format.OUTPUT_NAME], {export_format.INPUT_NAME: chunk}
            )
            index, score = _top(np.asarray(logits, dtype=np.float32))
            predictions.extend(
                Prediction(self.labels[i], s)
                for i, s in zip(index.tolist(), score.tolist(), strict=True)
            )
        return predictions

    def save(self, directory: Path) -> None:
        self.original.save(directory)
        shutil.copytree(self.path.parent, directory / export_format.EXPORT_DIR, dirs_exist_ok=True)


def _top(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's argmax and its softmax probability, as torch's ``softmax().max()``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probs = exp / exp.sum(axis=1, keepdims=True)
    index = probs.argmax(axis=1)
    return index, probs[np.arange(len(probs)), index]


def choose(
    manifest: export_format.ExportManifest, max_accuracy_delta: float
) -> export_format.Variant | None:
    """The export to serve: int8 if within the bound, else float32 if within, else
    None (torch)."""
    for variant in ("int8", "onnx"):
        if manifest.record(variant).accuracy_delta <= max_accuracy_delta:
            return variant
    return None


def serving_model(model: TrainedModel, files: Path, max_accuracy_delta: float) -> TrainedModel:
    """What serves the version whose saved ``files`` gave ``model``: an ONNX Runtime
    model when the version has exports within the bound, else ``model`` itself."""
    manifest = export_format.read_manifest(files)
    if manifest is None:
        return model
    variant = choose(manifest, max_accuracy_delta)
    if variant is None:
        log.info(
            "ONNX exports beyond the accuracy bound: serving torch",
            onnx_accuracy_delta=manifest.onnx.accuracy_delta,
            int8_accuracy_delta=manifest.int8.accuracy_delta,
            max_accuracy_delta=max_accuracy_delta,
        )
        return model
    record = manifest.record(variant)
    return OnnxClassifier.open(model, files / export_format.EXPORT_DIR / record.file)
