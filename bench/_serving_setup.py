"""What bench/serving.py measures against: two registered models in a fresh FORGE_HOME
(a vector model on scikit-learn's digits, and a text model on embedded sentences),
and the servers under test, started as a user starts them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from bench._common import MODEL, REPO, log
from forge.events import TrainingRequest
from forge.settings import Settings
from forge.training.base import Dataset
from forge.training.service import TrainingService

VECTOR_MODEL = "digits"
TEXT_MODEL = "tickets"
_TOPICS = {
    "billing": ["refund for order {}", "I was charged twice for invoice {}", "billing error on {}"],
    "shipping": ["parcel {} has not arrived", "shipment {} is stuck", "late delivery {}"],
    "login": ["cannot sign in to account {}", "password reset for user {} fails", "locked out {}"],
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def digits_rows() -> tuple[np.ndarray, list[str]]:
    digits = load_digits()
    return digits.data.astype(np.float32) / 16.0, [str(t) for t in digits.target]


def ticket_texts(n: int) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for i in range(n):
        label = list(_TOPICS)[i % len(_TOPICS)]
        template = _TOPICS[label][(i // len(_TOPICS)) % 3]
        texts.append(template.format(1000 + i))
        labels.append(label)
    return texts, labels


def train_models(settings: Settings) -> None:
    """Register version 1 of both models (champion), as a worker would."""
    from forge.embedding.service import EmbeddingService

    service = TrainingService.from_settings(settings)
    vectors, labels = digits_rows()
    _train(service, VECTOR_MODEL, vectors, labels, None)
    texts, labels = ticket_texts(300)
    embedder = EmbeddingService.from_settings(settings, None).embedder(MODEL)
    _train(service, TEXT_MODEL, embedder.encode(texts, 32), labels, MODEL)


def _train(
    service: TrainingService, name: str, x: np.ndarray, y: list[str], embedding_model: str | None
) -> None:
    data = Dataset(
        ids=[str(i) for i in range(len(y))],
        vectors=np.ascontiguousarray(x, dtype=np.float32),
        metadata=[{"label": label} for label in y],
    )
    request = TrainingRequest(
        id=f"bench-{name}", model=name, task="classifier", collection=name,
        params={"label_field": "label", "epochs": 30, "hidden_dim": 128},
    )  # fmt: skip
    service.train(request, data, embedding_model=embedding_model)
    log(f"trained {name} (classifier, {len(y)} rows)")


def forge_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FORGE_HOME=str(settings.home_dir),
        REDIS_URL=str(settings.redis_url),
        FORGE_STREAM_PREFIX=settings.stream_prefix,
        FORGE_LOG_LEVEL="WARNING",
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
    )
    return env


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f}s")


@contextmanager
def process(args: list[str], env: dict[str, str], ready_url: str, log_path: Path) -> Iterator[None]:
    with log_path.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            wait_http(ready_url, proc)
            yield
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def forge_serve(
    settings: Settings, port: int, folder: Path, workers: int = 1
) -> AbstractContextManager[None]:
    args = [sys.executable, "-m", "forge", "serve", "--port", str(port), "--workers", str(workers)]
    return process(args, forge_env(settings), f"http://127.0.0.1:{port}/health",
                   folder / f"serve-{port}.log")  # fmt: skip


def mlflow_serve(
    settings: Settings, model: str, port: int, folder: Path
) -> AbstractContextManager[None]:
    from forge.training.tracking import tracking_uri

    env = forge_env(settings) | {"MLFLOW_TRACKING_URI": tracking_uri(settings)}
    # mlflow runs `uvicorn` from PATH: this interpreter's, also when its venv is not active.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    args = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{model}@champion",
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    return process(args, env, f"http://127.0.0.1:{port}/ping", folder / f"mlflow-{port}.log")
