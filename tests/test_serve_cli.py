"""``forge serve`` as a program: it starts, says where it listens, answers, and stops on
SIGTERM; it refuses an open API beyond loopback; ``forge predict`` and ``forge search``
print the same through a running server as they do alone."""

from __future__ import annotations

import http.client
import os

import msgspec
import pytest
import redis

from forge.embedding.model import Embedder
from forge.keys import Keys
from forge.settings import Settings
from forge.training.service import TrainingService
from forge.vectorstore import Row, VectorStore
from tests.support.cli import REPO, run_forge
from tests.support.redis_helpers import TEST_REDIS_URL, wait_for
from tests.support.serving import ServerProcess, train, vectors

pytestmark = pytest.mark.slow


@pytest.fixture
def env(serving_settings: Settings) -> dict[str, str]:
    unset = {"POSTGRES_URL", "MLRUN_DBPATH", "FORGE_API_TOKEN", "FORGE_SERVE_HOST"}
    return {
        **{k: v for k, v in os.environ.items() if k not in unset},
        "REDIS_URL": TEST_REDIS_URL,
        "FORGE_STREAM_PREFIX": serving_settings.stream_prefix,
        "FORGE_HOME": str(serving_settings.home_dir),
        "MLFLOW_TRACKING_URI": str(serving_settings.mlflow_tracking_uri),
        "PYTHONPATH": str(REPO),
    }


def request(port: int, method: str, path: str, body: object = None) -> tuple[int, bytes]:
    """One request on a connection of its own."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, None if body is None else msgspec.json.encode(body))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "where", [["--host", "0.0.0.0"], ["--host", "::"], ["--host", "example.com"]]
)
def test_serve_refuses_an_open_api_beyond_loopback(env: dict[str, str], where: list[str]) -> None:
    done = run_forge(env, "serve", *where)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("forge: error: refusing to serve on ")
    assert "FORGE_API_TOKEN" in done.stderr


def test_serve_starts_answers_and_stops_on_sigterm(
    env: dict[str, str], training: TrainingService, model_name: str
) -> None:
    train(training, model_name)
    server = ServerProcess(env)
    with server:
        assert server.url.startswith("http://127.0.0.1:")
        assert request(server.port, "GET", "/health")[0] == 200
        body = {"inputs": [{"vector": v} for v in vectors(2)]}
        status, answer = request(server.port, "POST", f"/v1/models/{model_name}/predict", body)
        assert status == 200, answer
        assert msgspec.json.decode(answer)["version"] == 1
        assert server.stop() == 0
    ready = [line for line in server.stderr if "serving predictions" in line]
    assert len(ready) == 1
    assert "Traceback" not in "".join(server.stderr)


def test_workers_share_the_port_and_metrics_count_all_of_them(
    env: dict[str, str], training: TrainingService, model_name: str
) -> None:
    train(training, model_name)
    with ServerProcess(env, "--workers", "2") as server:
        wait_for(lambda: _answers(server.port, "/health"), timeout_s=180)
        body = {"inputs": [{"vector": v} for v in vectors(1)]}
        path = f"/v1/models/{model_name}/predict"
        for _ in range(6):
            assert request(server.port, "POST", path, body)[0] == 200
        _, text = request(server.port, "GET", "/metrics")
        line = f'forge_predictions_total{{model="{model_name}",variant="champion"}} 6.0'
        assert line in text.decode().splitlines()
        assert server.stop() == 0


def _answers(port: int, path: str) -> bool:
    try:
        return request(port, "GET", path)[0] == 200
    except OSError:
        return False


@pytest.mark.postgres
def test_predict_and_search_print_the_same_through_a_server(
    env: dict[str, str],
    training: TrainingService,
    model_name: str,
    redis_client: redis.Redis,
    serving_settings: Settings,
    pg_url: str,
    vector_store: VectorStore,
    collection_name: str,
    embedder: Embedder,
) -> None:
    train(training, model_name)
    texts = ["the cat sat on the mat", "stock markets fell sharply", "a kitten naps"]
    encoded = embedder.encode(texts, 8)
    rows = [Row(f"d{i}", encoded[i], "load", text=texts[i]) for i in range(3)]
    vector_store.write_batch(collection_name, rows, ["load"], "test:cli", model=embedder.name)
    env = {**env, "POSTGRES_URL": pg_url}
    given = [arg for v in vectors(3) for arg in ("--vector", ",".join(map(str, v)))]
    commands = [
        ["predict", model_name, *given, "--json"],
        ["predict", f"{model_name}@1", *given],
        ["predict", f"{model_name}@7", *given[:2]],
        ["search", collection_name, "cats", "-k", "2", "--json"],
        ["search", collection_name, "cats", "-k", "2"],
    ]
    with ServerProcess(env) as server:
        served = {"FORGE_SERVE_PORT": str(server.port)}
        remote = [run_forge({**env, **served}, *argv) for argv in commands]
    stats = Keys.from_settings(serving_settings).variant_stats(model_name, 1)
    assert redis_client.hget(stats, "predictions") == b"6"  # the server answered
    local = [run_forge(env, *argv) for argv in commands]  # FORGE_SERVE_PORT refuses
    for argv, there, here in zip(commands, remote, local, strict=True):
        assert (there.returncode, there.stdout) == (here.returncode, here.stdout), argv
    missing = f"forge: error: model {model_name!r} has no version 7\n"
    assert remote[2].stderr == local[2].stderr == missing
