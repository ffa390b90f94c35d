"""Registered versions are MLflow models: ``mlflow.pyfunc`` loads them by alias and by
number and predicts what Forge predicts, ``mlflow models serve`` answers with the same
labels, and nothing in them is pickled. Real MLflow (a SQLite store of this module's),
the packaged embedding model; no PostgreSQL or Redis.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from forge.cli.main import main
from forge.embedding.model import Embedder
from forge.events import TrainingRequest
from forge.settings import Settings
from forge.training.base import Dataset
from forge.training.service import TrainingService

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER = {"label_field": "digit", "hidden_dim": 32, "epochs": 3, "batch_size": 64}
TOPICS = {"billing": "I want a refund for order {}", "login": "I cannot log in to account {}"}
SERVE_TIMEOUT_S = 120.0


def train(
    service: TrainingService, data: Dataset, task: str, params: dict[str, Any], **kw: Any
) -> str:
    name = f"m_{uuid.uuid4().hex[:10]}"
    request = TrainingRequest(id="r1", model=name, task=task, collection="c", params=params)
    service.train(request, data, **kw)
    return name


@pytest.fixture(scope="module")
def classifier(service: TrainingService, digits: Dataset) -> str:
    """One small classifier on raw vectors, shared by the tests that only read it."""
    return train(service, digits, "classifier", CLASSIFIER)


@pytest.fixture(scope="module")
def text_data(embedder: Embedder) -> tuple[Dataset, list[str]]:
    texts = [template.format(i) for template in TOPICS.values() for i in range(15)]
    topics = [topic for topic in TOPICS for _ in range(15)]
    vectors = embedder.encode(texts, 32)
    rows = Dataset([f"t{i}" for i in range(30)], vectors, [{"topic": t} for t in topics])
    return rows, texts


@pytest.fixture
def mlflow_env(store: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Where ``models:/`` URIs resolve and where the pyfunc's Forge settings come from."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(store.mlflow_tracking_uri))
    monkeypatch.setenv("FORGE_HOME", str(store.home_dir))
    return store


def labels(frame: pd.DataFrame) -> list[str]:
    assert list(frame.columns) == ["label", "score"]
    return [str(label) for label in frame["label"]]


def forge_labels(service: TrainingService, name: str, vectors: np.ndarray[Any, Any]) -> list[str]:
    model, _ = service.load(name)
    return [p.label for p in model.predict(vectors)]


def local_path(uri: str) -> Path:
    return Path(unquote(urlsplit(uri).path))


# ---------------------------------------------------------------------- pyfunc


def test_a_version_loads_by_alias_and_number_and_predicts_as_forge(
    service: TrainingService, classifier: str, digits: Dataset, mlflow_env: Settings
) -> None:
    vectors = digits.vectors[:40]
    expected = forge_labels(service, classifier, vectors)
    model, _ = service.load(classifier)
    scores = [p.score for p in model.predict(vectors)]
    for uri in (f"models:/{classifier}@champion", f"models:/{classifier}/1"):
        loaded = mlflow.pyfunc.load_model(uri)
        by_array = loaded.predict(vectors)
        assert labels(by_array) == expected
        np.testing.assert_allclose(by_array["score"], scores, rtol=1e-5)
        assert labels(loaded.predict(pd.DataFrame(vectors))) == expected
        one_column = pd.DataFrame({"vector": list(vectors.astype(np.float64))})
        assert labels(loaded.predict(one_column)) == expected


def test_a_raw_vector_version_has_no_embedding_model_and_refuses_texts(
    service: TrainingService,
    classifier: str,
    mlflow_env: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    version = service.versions.resolve(classifier)
    assert version.embedding_model is None
    assert "forge.embedding_model" not in service.client.get_run(version.run_id).data.tags
    loaded = mlflow.pyfunc.load_model(f"models:/{classifier}@champion")
    assert loaded.metadata.get_input_schema().is_tensor_spec()
    with pytest.raises(mlflow.exceptions.MlflowException):
        loaded.predict(pd.DataFrame({"text": ["a text"]}))
    assert main(["predict", classifier, "--text", "a text"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "trained on raw vectors" in err


@pytest.fixture(scope="module")
def text_model(
    service: TrainingService, text_data: tuple[Dataset, list[str]], embedder: Embedder
) -> str:
    """A classifier trained on embedded texts, shared by the tests that only read it."""
    rows, _ = text_data
    params = {**CLASSIFIER, "label_field": "topic", "epochs": 20, "min_rows": 10}
    return train(service, rows, "classifier", params, embedding_model=embedder.name)


def test_a_model_of_embedded_texts_predicts_texts_and_vectors(
    service: TrainingService,
    text_model: str,
    text_data: tuple[Dataset, list[str]],
    embedder: Embedder,
    mlflow_env: Settings,
) -> None:
    _, texts = text_data
    name = text_model
    assert service.versions.resolve(name).embedding_model == embedder.name
    queries = ["please refund my money", "my password does not work", texts[0]]
    expected = forge_labels(service, name, embedder.encode(queries, 32))
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert labels(loaded.predict(pd.DataFrame({"text": queries}))) == expected
    assert labels(loaded.predict({"text": queries})) == expected  # serving's "inputs" form
    assert expected[:2] == ["billing", "login"]
    encoded = list(embedder.encode(queries, 32))
    assert labels(loaded.predict(pd.DataFrame({"vector": encoded}))) == expected
    mixed = pd.DataFrame({"text": [queries[0], None], "vector": [None, encoded[1]]})
    assert labels(loaded.predict(mixed)) == expected[:2]


def test_a_model_of_embedded_texts_takes_a_bare_array_or_list_of_texts(
    service: TrainingService, text_model: str, embedder: Embedder, mlflow_env: Settings
) -> None:
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    queries = ["please refund my money", "my password does not work"]
    expected = forge_labels(service, text_model, embedder.encode(queries, 32))
    loaded = mlflow.pyfunc.load_model(f"models:/{text_model}@champion")
    assert labels(loaded.predict(np.array(queries))) == expected
    assert labels(loaded.predict(queries)) == expected
    assert labels(loaded.predict(pd.Series(queries))) == expected
    # What `mlflow models serve` makes of {"inputs": [...]} and {"instances": [...]}.
    schema = loaded.metadata.get_input_schema()
    for key in ("inputs", "instances"):
        assert labels(loaded.predict(infer_and_parse_data({key: queries}, schema))) == expected
    # Bare vectors are still refused, with the reason, in Python as over JSON.
    vectors = embedder.encode(queries, 32)
    for refused in (vectors, infer_and_parse_data({"inputs": vectors.tolist()}, schema)):
        with pytest.raises(mlflow.exceptions.MlflowException, match="'vector' column"):
            loaded.predict(refused)
    with pytest.raises(mlflow.exceptions.MlflowException, match="row 1: no text"):
        loaded.predict(np.array([queries[0], None], dtype=object))


def test_training_leaves_mlflow_fluent_state_as_it_was(
    service: TrainingService, digits: Dataset, mlflow_env: Settings
) -> None:
    from mlflow.tracking._tracking_service import utils

    before = (utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI"), mlflow.active_run())
    name = train(service, digits, "clustering", {"n_clusters": 10, "max_iter": 3})
    after = (utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI"), mlflow.active_run())
    assert after == before
    expected = forge_labels(service, name, digits.vectors[:30])
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/1")
    assert labels(loaded.predict(digits.vectors[:30])) == expected


def test_a_version_is_its_runs_logged_model_with_no_pickles(
    service: TrainingService, classifier: str
) -> None:
    version = service.versions.resolve(classifier)
    client = service.client
    (output,) = client.get_run(version.run_id).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == version.run_id
    assert str(logged.status) == "READY"
    assert version.source == logged.artifact_location
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": classifier, "version": 1}]
    assert {m.key for m in logged.metrics} >= {"val_macro_f1", "val_accuracy"}
    folder = local_path(version.source)
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert {"MLmodel", "input_example.json", "artifacts/forge_model/config.json"} <= files
    assert "artifacts/forge_model/model.safetensors" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle")) or "pickle" in f]
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert "python_model" not in pyfunc  # models from code: no cloudpickled object
    assert pyfunc["config"] == {"task": "classifier", "input_dim": 64}
    assert mlmodel["model_id"] == logged.model_id
    requirements = (folder / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in requirements)
    assert not any(r.startswith("forge") for r in requirements)


# ---------------------------------------------------------------------- serving


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request_json(url: str, body: Any | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=30) as r:
            text = r.read().decode()
            return r.status, json.loads(text) if body is not None else text
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def served(mlflow_env: Settings, classifier: str, tmp_path: Path) -> Iterator[str]:
    """``mlflow models serve`` of the champion, in its own process group."""
    port = free_port()
    # mlflow runs `uvicorn` from PATH: this interpreter's, also when its venv is not active.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": path}
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    model = f"models:/{classifier}@champion"
    argv = [mlflow_cli, "models", "serve", "-m", model, "--env-manager", "local"]
    log_file = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [*argv, "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, proc, tmp_path / "serve.log")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()


def wait_until_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Readiness, not speed: poll ``/ping`` until it answers or the server gives up."""
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited {proc.returncode}:\n{log.read_text()}")
        try:
            if request_json(f"{url}/ping")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve not ready after {SERVE_TIMEOUT_S:g}s:\n{log.read_text()}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_forges_labels(
    served: str, service: TrainingService, classifier: str, digits: Dataset
) -> None:
    vectors = digits.vectors[:10]
    expected = forge_labels(service, classifier, vectors)
    split = pd.DataFrame(vectors.tolist()).to_dict(orient="split")
    bodies: list[dict[str, Any]] = [
        {"inputs": vectors.tolist()},
        {"dataframe_split": {"columns": split["columns"], "data": split["data"]}},
    ]
    for body in bodies:
        status, answer = request_json(f"{served}/invocations", body)
        assert status == 200, answer
        assert [p["label"] for p in answer["predictions"]] == expected
    status, answer = request_json(f"{served}/invocations", {"inputs": [[0.5, 0.5]]})
    assert status == 400
    assert "shape" in answer


def test_forge_loads_a_version_without_mlflows_pyfunc(
    classifier: str, mlflow_env: Settings
) -> None:
    """The hot path reads Forge's files out of the MLflow model (what ``forge predict``
    and the serving engine use) without MLflow's pyfunc: no code file run, no
    DataFrames."""
    code = (
        "import sys; from forge.settings import Settings;"
        "from forge.training.service import TrainingService;"
        "s = TrainingService.from_settings(Settings.from_env());"
        f"m, v = s.load({classifier!r});"
        "print(m.input_dim, 'mlflow.pyfunc' in sys.modules,"
        " any(n.startswith('code_model_') for n in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["64", "False", "False"]
