"""Optimized exports of a trained classifier (a request's ``"export": ["onnx"]``): the
MLP head as ONNX, a dynamically int8-quantized copy, and how far each strays from the
torch model on the validation split.

The exports are files among the version's own (``forge_model/exports/`` in the MLflow
model), beside ``exports.json``, which records each file's validation accuracy and its
``accuracy_delta``: the torch model's validation accuracy minus the export's (positive:
the export is worse). Serving picks a runtime from that record
(``forge.training.onnx_runtime``); MLflow's pyfunc keeps loading the torch model, so a
version with exports serves through ``mlflow models serve`` as before.

The head is exported through torch's TorchScript exporter (``dynamo=False``: it needs
``onnx`` only, not ``onnxscript``) with its linear layers written as MatMul and Add:
ONNX Runtime's dynamic quantization rewrites MatMul to integer arithmetic but leaves
Gemm, the legacy exporter's form of ``nn.Linear``, in float.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import msgspec
import structlog
import torch
from torch import nn

from forge.errors import PermanentError
from forge.training.base import Dataset, Prediction, TrainedModel, Vectors, read_json, write_json
from forge.training.classifier_model import MLPHead
from forge.training.export_format import (
    EXPORT_DIR,
    EXPORTABLE_TASKS,
    INPUT_NAME,
    INT8_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    OPSET,
    OUTPUT_NAME,
    TAG_EXPORTS,
    TAG_INT8_DELTA,
    TAG_ONNX_DELTA,
    ExportManifest,
    ExportRecord,
)

log = structlog.get_logger(__name__)


class _MatMulHead(nn.Module):
    """The classifier's MLP head with ``x @ W.T + b`` in place of ``nn.Linear``, so the
    exporter writes MatMul (quantizable) rather than Gemm; same weights, same logits."""

    def __init__(self, net: MLPHead) -> None:
        super().__init__()
        self.w1 = nn.Parameter(net.hidden.weight.detach().t().contiguous())
        self.b1 = nn.Parameter(net.hidden.bias.detach().clone())
        self.w2 = nn.Parameter(net.output.weight.detach().t().contiguous())
        self.b2 = nn.Parameter(net.output.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(torch.matmul(x, self.w1) + self.b1)
        return torch.matmul(hidden, self.w2) + self.b2


def check_exportable(task: str, formats: list[str]) -> None:
    """Refuse, before any training, an export the task has none of."""
    if formats and task not in EXPORTABLE_TASKS:
        raise PermanentError(
            f"export {formats} is available for the {sorted(EXPORTABLE_TASKS)} task only,"
            f" not {task!r}"
        )


def export_onnx(net: MLPHead, input_dim: int, path: Path) -> None:
    """``net`` (an ``MLPHead``) as an ONNX graph taking any number of rows."""
    head = _MatMulHead(net).eval()
    example = torch.zeros((1, input_dim), dtype=torch.float32)
    # The TorchScript exporter says it is deprecated; it is what exports without
    # onnxscript, and the graph is checked against torch on every export.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            head,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "rows"}, OUTPUT_NAME: {0: "rows"}},
            opset_version=OPSET,
            dynamo=False,
        )


def quantize_int8(source: Path, target: Path) -> None:
    """``source`` with its MatMul weights as int8 and activations quantized per batch,
    after ONNX Runtime's pre-processing (shape inference, graph optimization), which
    its quantizer asks for."""
    from onnxruntime.quantization import (  # type: ignore[import-untyped]  # no stubs
        QuantType,
        quantize_dynamic,
    )
    from onnxruntime.quantization.shape_inference import (  # type: ignore[import-untyped]
        quant_pre_process,
    )

    prepared = target.with_name(f".{target.name}.prepared")
    try:
        quant_pre_process(str(source), str(prepared))
        quantize_dynamic(prepared, target, weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


def accuracy(predictions: list[Prediction], truth: list[str]) -> float:
    if not truth:
        return float("nan")
    right = sum(p.label == t for p, t in zip(predictions, truth, strict=True))
    return right / len(truth)


def build(model: TrainedModel, net: MLPHead, validation: Dataset, truth: list[str]) -> Path:
    """Export ``model`` (whose torch network is ``net``) into a new temporary folder with
    its manifest; the caller owns the folder."""
    from forge.training.onnx_runtime import OnnxClassifier

    folder = Path(tempfile.mkdtemp(prefix="forge-exports-"))
    try:
        export_onnx(net, model.input_dim, folder / ONNX_FILE)
        quantize_int8(folder / ONNX_FILE, folder / INT8_FILE)
        torch_accuracy = accuracy(model.predict(validation.vectors), truth)
        records = {}
        for variant, file in (("onnx", ONNX_FILE), ("int8", INT8_FILE)):
            runtime = OnnxClassifier.open(model, folder / file)
            got = accuracy(runtime.predict(validation.vectors), truth)
            records[variant] = ExportRecord(
                file=file, accuracy=got, accuracy_delta=torch_accuracy - got
            )
        manifest = ExportManifest(
            validation_rows=len(truth),
            torch_accuracy=torch_accuracy,
            onnx=records["onnx"],
            int8=records["int8"],
        )
        write_json(folder / MANIFEST_FILE, manifest)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


class ExportedModel:
    """A trained model and its exports (``files``: name -> content, a head's graph is
    small): saves both, predicts and reports as the model. ``metrics`` is the model's
    own dict, with the exports' figures added."""

    def __init__(
        self, model: TrainedModel, files: dict[str, bytes], manifest: ExportManifest
    ) -> None:
        self.model, self.files, self.manifest = model, files, manifest
        self.task = model.task
        self.metrics = model.metrics
        self.primary_metric = model.primary_metric

    @property
    def input_dim(self) -> int:
        return self.model.input_dim

    @property
    def size_bytes(self) -> int:
        return self.model.size_bytes

    def predict(self, vectors: Vectors) -> list[Prediction]:
        return self.model.predict(vectors)

    def save(self, directory: Path) -> None:
        self.model.save(directory)
        (directory / EXPORT_DIR).mkdir(parents=True, exist_ok=True)
        for name, content in self.files.items():
            (directory / EXPORT_DIR / name).write_bytes(content)

    def tags(self) -> dict[str, str]:
        """What the run, its LoggedModel and the version are tagged with."""
        return {
            TAG_EXPORTS: "onnx",
            TAG_ONNX_DELTA: repr(self.manifest.onnx.accuracy_delta),
            TAG_INT8_DELTA: repr(self.manifest.int8.accuracy_delta),
        }


def attach(model: TrainedModel, validation: Dataset, truth: list[str]) -> ExportedModel:
    """``model`` with its ONNX exports: built, measured on ``validation`` (whose labels
    are ``truth``) and logged as metrics (``onnx_accuracy_delta``,
    ``onnx_int8_accuracy_delta``, ...)."""
    from forge.training.classifier_model import ClassifierModel

    if not isinstance(model, ClassifierModel):
        raise PermanentError(f"a {model.task} model has no ONNX export")
    folder = build(model, model.net, validation, truth)
    try:
        files = {path.name: path.read_bytes() for path in folder.iterdir()}
        manifest = msgspec.convert(read_json(folder / MANIFEST_FILE), ExportManifest)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    model.metrics.update(
        onnx_accuracy=manifest.onnx.accuracy,
        onnx_accuracy_delta=manifest.onnx.accuracy_delta,
        onnx_int8_accuracy=manifest.int8.accuracy,
        onnx_int8_accuracy_delta=manifest.int8.accuracy_delta,
    )
    log.info(
        "exported to ONNX",
        validation_rows=manifest.validation_rows,
        onnx_accuracy_delta=manifest.onnx.accuracy_delta,
        int8_accuracy_delta=manifest.int8.accuracy_delta,
    )
    return ExportedModel(model, files, manifest)


def validation_rows(data: Dataset, params: msgspec.Struct) -> tuple[Dataset, list[str]]:
    """The classifier's validation split of ``data``: the rows and labels its training
    held out (the same seeded split ``ClassifierTrainer.fit`` makes)."""
    from forge.training.classifier import ClassifierParams
    from forge.training.validation import stratified_split

    if not isinstance(params, ClassifierParams):
        raise PermanentError("ONNX exports are made of classifier models only")
    labelled, labels = data.labels(params.label_field)
    _, val = stratified_split(labels, params.validation_fraction, params.seed)
    return labelled.subset(val), [labels[i] for i in val]


def tags_of(tags: dict[str, str]) -> dict[str, str]:
    """The export tags among a run's ``tags``."""
    return {k: v for k, v in tags.items() if k in {TAG_EXPORTS, TAG_ONNX_DELTA, TAG_INT8_DELTA}}


def unwrap(model: TrainedModel) -> TrainedModel:
    """The torch model behind a model served through ONNX (for warm starts)."""
    original = getattr(model, "original", None)
    return original if original is not None else model
