"""What an exported version holds, read by whoever serves it: the files under
``forge_model/exports/``, their manifest (``exports.json``), the tags, and the
graph's input and output names. Making exports is ``forge.training.exports``;
running them is ``forge.training.onnx_runtime``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

from forge.errors import PermanentError
from forge.training.base import Vectors, read_json

EXPORT_DIR = "exports"
MANIFEST_FILE = "exports.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INPUT_NAME = "vectors"
OUTPUT_NAME = "logits"
# Opset 17: every ONNX Runtime release Forge admits runs it.
OPSET = 17
# Tags a version with exports carries (on its run, its LoggedModel and the version).
TAG_EXPORTS = "forge.exports"
TAG_ONNX_DELTA = "forge.onnx.accuracy_delta"
TAG_INT8_DELTA = "forge.onnx_int8.accuracy_delta"
EXPORTABLE_TASKS = frozenset({"classifier"})

Variant = Literal["onnx", "int8"]


class ExportRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One exported file and how it does on the validation split."""

    file: str
    accuracy: float
    accuracy_delta: float


class ExportManifest(msgspec.Struct, frozen=True, kw_only=True):
    """``exports.json``: the torch model's validation accuracy and each export's."""

    validation_rows: int
    torch_accuracy: float
    onnx: ExportRecord
    int8: ExportRecord
    opset: int = OPSET

    def record(self, variant: Variant) -> ExportRecord:
        return self.onnx if variant == "onnx" else self.int8


def read_manifest(files: Path) -> ExportManifest | None:
    """The manifest among a saved model's ``files``; None for a version without exports."""
    path = files / EXPORT_DIR / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return msgspec.convert(read_json(path), ExportManifest)
    except msgspec.ValidationError as exc:
        raise PermanentError(f"unreadable export manifest {path}: {exc}") from None


def vectors_of(rows: Vectors) -> np.ndarray:
    """``rows`` as the contiguous float32 array ONNX Runtime takes."""
    return np.ascontiguousarray(rows, dtype=np.float32)
