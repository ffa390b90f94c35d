"""Optimized exports: a request's ``"export": ["onnx"]`` logs an ONNX export of the
classifier and an int8 one with their accuracy deltas on the validation split, serving
runs the one within ``FORGE_ONNX_MAX_ACCURACY_DELTA`` (torch otherwise) with torch's
labels, and MLflow's pyfunc still loads the version. Real MLflow (this module's SQLite
store, tests/mlflow_model_fixtures.py) on scikit-learn's digits; no Redis."""

from __future__ import annotations

import math
import shutil
import uuid
from pathlib import Path

import mlflow
import msgspec
import numpy as np
import pytest
import redis

from forge.errors import ConfigError, InvalidEvent, PermanentError
from forge.events import TrainingRequest, decode_as, encode
from forge.observability.metrics import Metrics
from forge.serving.calls import PredictAnswer
from forge.serving.engine import PredictionEngine
from forge.settings import Settings
from forge.training import artifacts, export_format, exports
from forge.training.base import Dataset
from forge.training.classifier_model import ClassifierModel
from forge.training.onnx_runtime import OnnxClassifier, choose, serving_model
from forge.training.service import TrainingService
from tests.support import serving

CLASSIFIER = {"label_field": "digit", "hidden_dim": 64, "epochs": 20, "learning_rate": 0.01}
HUGE_BOUND = 1.0


def request(task: str = "classifier", **fields: object) -> TrainingRequest:
    return TrainingRequest(
        id=f"r-{uuid.uuid4().hex[:8]}",
        model=f"m_{uuid.uuid4().hex[:10]}",
        task=task,
        collection="digits",
        params=dict(CLASSIFIER) if task == "classifier" else {},
        export=["onnx"],
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def exported(service: TrainingService, digits: Dataset) -> TrainingRequest:
    """One classifier trained with exports, shared by the tests that only read it."""
    asked = request()
    service.train(asked, digits)
    return asked


def bounded(store: Settings, bound: float) -> TrainingService:
    """A service of its own (its own model cache) serving under ``bound``."""
    return TrainingService.from_settings(store.replace(onnx_max_accuracy_delta=bound))


def local_files(service: TrainingService, model: str) -> Path:
    version = service.versions.resolve(model)
    return artifacts.model_files(service._download(version))


# ---------------------------------------------------------------------- contract


def test_export_is_optional_and_unknown_formats_are_refused_by_the_type() -> None:
    plain = TrainingRequest(id="a", model="m", task="classifier", collection="c")
    assert plain.export == []
    decoded = decode_as(TrainingRequest, encode(request()))
    assert decoded.export == ["onnx"]
    raw = msgspec.json.decode(encode(plain))
    with pytest.raises(InvalidEvent, match="export"):
        decode_as(TrainingRequest, msgspec.json.encode({**raw, "export": ["tflite"]}))


def test_a_task_without_exports_fails_before_training(
    service: TrainingService, digits: Dataset
) -> None:
    with pytest.raises(PermanentError, match="classifier"):
        service.train(request("clustering"), digits)


def test_the_bound_is_a_setting_that_must_not_be_negative() -> None:
    assert Settings().onnx_max_accuracy_delta == 0.005
    env = {"FORGE_ONNX_MAX_ACCURACY_DELTA": "0.02"}
    assert Settings.from_env(env).onnx_max_accuracy_delta == 0.02
    with pytest.raises(ConfigError, match="onnx_max_accuracy_delta"):
        Settings(onnx_max_accuracy_delta=-0.1)
    with pytest.raises(ConfigError, match="onnx_max_accuracy_delta"):
        Settings(onnx_max_accuracy_delta=math.nan)


# ---------------------------------------------------------------------- exports


def test_both_exports_are_artifacts_of_the_version_with_their_accuracy_deltas(
    service: TrainingService, exported: TrainingRequest
) -> None:
    version = service.versions.resolve(exported.model)
    files = local_files(service, exported.model)
    names = sorted(p.name for p in (files / exports.EXPORT_DIR).iterdir())
    assert names == [exports.MANIFEST_FILE, exports.INT8_FILE, exports.ONNX_FILE]
    manifest = export_format.read_manifest(files)
    assert manifest is not None
    assert manifest.validation_rows > 0
    run = service.client.get_run(version.run_id).data
    for variant, prefix in (("onnx", "onnx"), ("int8", "onnx_int8")):
        record = manifest.record(variant)
        assert record.accuracy_delta == pytest.approx(manifest.torch_accuracy - record.accuracy)
        assert run.metrics[f"{prefix}_accuracy_delta"] == pytest.approx(record.accuracy_delta)
        assert run.metrics[f"{prefix}_accuracy"] == pytest.approx(record.accuracy)
    # The torch model's own validation accuracy is the one the training reported.
    assert manifest.torch_accuracy == pytest.approx(run.metrics["val_accuracy"])
    for tags in (run.tags, version.tags):
        assert tags[exports.TAG_EXPORTS] == "onnx"
        assert float(tags[exports.TAG_ONNX_DELTA]) == manifest.onnx.accuracy_delta
        assert float(tags[exports.TAG_INT8_DELTA]) == manifest.int8.accuracy_delta
    event = service.registered(exported)
    assert event is not None
    assert event.event.metrics["onnx_int8_accuracy_delta"] == manifest.int8.accuracy_delta


def test_a_request_without_export_logs_none(service: TrainingService, digits: Dataset) -> None:
    plain = msgspec.structs.replace(request(), export=[])
    _, registered = service.train(plain, digits)
    assert export_format.read_manifest(local_files(service, plain.model)) is None
    assert exports.TAG_EXPORTS not in registered.version.tags
    assert "onnx_accuracy_delta" not in registered.result["metrics"]


# ---------------------------------------------------------------------- serving


def test_serving_runs_int8_within_the_bound_with_torch_labels(
    store: Settings, exported: TrainingRequest, digits: Dataset
) -> None:
    served, _ = bounded(store, HUGE_BOUND).load(exported.model)
    assert isinstance(served, OnnxClassifier)
    assert served.runtime == exports.INT8_FILE
    assert isinstance(served.original, ClassifierModel)
    rows = digits.vectors[:300]
    torch_predictions = served.original.predict(rows)
    onnx_predictions = served.predict(rows)
    # int8 arithmetic may flip a near tie; wherever torch is sure, the labels agree.
    sure = [i for i, p in enumerate(torch_predictions) if p.score > 0.6]
    assert len(sure) > 250
    assert [onnx_predictions[i].label for i in sure] == [torch_predictions[i].label for i in sure]
    same = sum(a.label == b.label for a, b in zip(onnx_predictions, torch_predictions, strict=True))
    assert same >= 0.99 * len(rows)
    assert all(0 <= p.score <= 1 for p in onnx_predictions)
    assert served.metrics == served.original.metrics
    with pytest.raises(PermanentError, match="dimension"):
        served.predict(digits.vectors[:2, :10])


def test_the_float32_export_gives_torch_labels_and_scores(
    service: TrainingService, exported: TrainingRequest, digits: Dataset
) -> None:
    files = local_files(service, exported.model)
    torch_model = ClassifierModel.load(files)
    fp32 = OnnxClassifier.open(torch_model, files / exports.EXPORT_DIR / exports.ONNX_FILE)
    rows = digits.vectors[:300]
    expected = torch_model.predict(rows)
    got = fp32.predict(rows)
    assert [p.label for p in got] == [p.label for p in expected]
    assert [p.score for p in got] == pytest.approx([p.score for p in expected], abs=1e-5)


def test_serving_keeps_torch_when_the_exports_are_beyond_the_bound(
    service: TrainingService, exported: TrainingRequest, tmp_path: Path
) -> None:
    files = local_files(service, exported.model)
    manifest = export_format.read_manifest(files)
    assert manifest is not None
    worse = msgspec.structs.replace(
        manifest,
        onnx=msgspec.structs.replace(manifest.onnx, accuracy_delta=0.02),
        int8=msgspec.structs.replace(manifest.int8, accuracy_delta=0.03),
    )
    copy = tmp_path / "files"
    shutil.copytree(files, copy)
    (copy / exports.EXPORT_DIR / exports.MANIFEST_FILE).write_bytes(msgspec.json.encode(worse))
    torch_model = ClassifierModel.load(copy)
    assert serving_model(torch_model, copy, 0.0) is torch_model
    assert serving_model(torch_model, copy, 0.01) is torch_model
    fp32 = serving_model(torch_model, copy, 0.025)
    assert isinstance(fp32, OnnxClassifier)
    assert fp32.runtime == exports.ONNX_FILE
    int8 = serving_model(torch_model, copy, 0.03)
    assert isinstance(int8, OnnxClassifier)
    assert int8.runtime == exports.INT8_FILE


def test_choose_prefers_int8_then_float32_then_torch() -> None:
    def manifest(onnx_delta: float, int8_delta: float) -> exports.ExportManifest:
        return exports.ExportManifest(
            validation_rows=10,
            torch_accuracy=0.9,
            onnx=exports.ExportRecord(file="a", accuracy=0.9, accuracy_delta=onnx_delta),
            int8=exports.ExportRecord(file="b", accuracy=0.9, accuracy_delta=int8_delta),
        )

    assert choose(manifest(0.0, 0.0), 0.0) == "int8"
    assert choose(manifest(0.0, -0.01), 0.0) == "int8"  # the export did better
    assert choose(manifest(0.0, 0.01), 0.005) == "onnx"
    assert choose(manifest(0.01, 0.01), 0.005) is None


def test_a_warm_start_from_an_onnx_served_version_continues_the_torch_model(
    store: Settings, exported: TrainingRequest, digits: Dataset
) -> None:
    service = bounded(store, HUGE_BOUND)
    again = msgspec.structs.replace(
        exported, id=f"r-{uuid.uuid4().hex[:8]}", warm_start_from="latest", export=[]
    )
    _, registered = service.train(again, digits)
    assert registered.result["metrics"]["warm_start_classes"] == 10


def test_the_prediction_engine_answers_through_onnx_with_torchs_labels(
    serving_settings: Settings, redis_client: redis.Redis, model_name: str
) -> None:
    settings = serving_settings.replace(onnx_max_accuracy_delta=HUGE_BOUND)
    training = TrainingService.from_settings(settings)
    trained = TrainingRequest(
        id=f"r-{uuid.uuid4().hex[:8]}",
        model=model_name,
        task="classifier",
        collection="rows",
        params={**serving.PARAMS, "epochs": 30},
        export=["onnx"],
    )
    training.train(trained, serving.dataset(200))
    engine = PredictionEngine.from_settings(
        settings, redis_client, Metrics(gpu=False).serving, training=training
    )
    (answer,) = engine.predict([serving.call(model_name, 20)])
    assert isinstance(answer, PredictAnswer), answer
    served, _ = training.load(model_name)
    assert isinstance(served, OnnxClassifier)
    rows = np.asarray(serving.vectors(20), dtype=np.float32)
    expected = served.predict(rows)
    assert [p.label for p in answer.predictions] == [p.label for p in expected]
    assert [p.score for p in answer.predictions] == pytest.approx([p.score for p in expected])
    by_torch = exports.unwrap(served).predict(rows)
    sure = [i for i, p in enumerate(by_torch) if p.score > 0.6]
    assert [expected[i].label for i in sure] == [by_torch[i].label for i in sure]


# ---------------------------------------------------------------------- pyfunc


def test_mlflow_pyfunc_still_loads_an_exported_version(
    service: TrainingService,
    exported: TrainingRequest,
    digits: Dataset,
    monkeypatch: pytest.MonkeyPatch,
    store: Settings,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(store.mlflow_tracking_uri))
    monkeypatch.setenv("FORGE_HOME", str(store.home_dir))
    rows = digits.vectors[:40]
    torch_model = exports.unwrap(service.load(exported.model)[0])
    loaded = mlflow.pyfunc.load_model(f"models:/{exported.model}@champion")
    frame = loaded.predict(rows)
    assert list(frame["label"]) == [p.label for p in torch_model.predict(rows)]
