"""Small registered models for serving tests: a few 4-d rows, a two-epoch classifier,
registered in MLflow with the promotion policy asked for."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from forge.events import PredictInput, TrainingRequest
from forge.serving.calls import PredictCall
from forge.training.base import Dataset
from forge.training.service import TrainingService
from tests.support.cli import REPO

DIM = 4
PARAMS = {"label_field": "y", "hidden_dim": 8, "epochs": 2}


def dataset(rows: int = 60, seed: int = 0) -> Dataset:
    """Rows labelled ``pos``/``neg`` by the sign of their first value."""
    x = np.random.default_rng(seed).normal(size=(rows, DIM)).astype(np.float32)
    labels = ["pos" if v > 0 else "neg" for v in x[:, 0]]
    return Dataset([f"r{i}" for i in range(rows)], x, [{"y": y} for y in labels])


def train(
    service: TrainingService,
    model: str,
    *,
    promote: str = "always",
    data: Dataset | None = None,
    embedding_model: str | None = None,
    params: dict[str, object] | None = None,
) -> int:
    """Register a new version of ``model``; return its number."""
    request = TrainingRequest(
        id=f"t-{uuid.uuid4().hex[:12]}",
        model=model,
        task="classifier",
        collection="rows",
        params=params or PARAMS,
        promote=promote,  # type: ignore[arg-type]
    )
    fitted = service.fit(request, data or dataset(), embedding_model=embedding_model)
    return service.register(fitted).version.version


def vectors(n: int = 1, seed: int = 1) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    return [[float(v) for v in row] for row in rng.normal(size=(n, DIM))]


def call(model: str, n: int = 1, **fields: object) -> PredictCall:
    """A call with ``n`` vector inputs."""
    inputs = [PredictInput(vector=v) for v in vectors(n)]
    return PredictCall(model, inputs, **fields)  # type: ignore[arg-type]


def record_loads(
    service: TrainingService, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, str | None]]:
    """Every ``service.load`` from now on, as (thread name, version ref), in order: which
    thread paid for a cold load."""
    loads: list[tuple[str, str | None]] = []
    real_load = service.load

    def load(model: str, ref: str | None = None) -> Any:
        loads.append((threading.current_thread().name, ref))
        return real_load(model, ref)

    monkeypatch.setattr(service, "load", load)
    return loads


class ServerProcess:
    """``forge serve --port 0`` as a program: started, waited on until its one "serving
    predictions" log line names its address, stopped with SIGTERM."""

    def __init__(self, env: Mapping[str, str], *args: str) -> None:
        self.env = {**env, "FORGE_LOG_FORMAT": "json"}
        self.args = args
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forge.cli.main", "serve", "--port", "0", *self.args],
            env=self.env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_ready()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> int:
        """SIGTERM, then the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("forge serve did not stop on SIGTERM") from None

    def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put("")  # the end

    def _wait_ready(self, timeout_s: float = 180.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if not line:
                raise AssertionError(f"forge serve exited: {''.join(self.stderr)}")
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "serving predictions":
                return str(record["url"])
        raise AssertionError(f"forge serve not ready: {''.join(self.stderr)}")
