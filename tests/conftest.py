from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import structlog

from forge.observability.logging import configure_logging
from forge.observability.metrics import Metrics
from forge.runtime.context import Context
from forge.settings import Settings
from tests.support.redis_helpers import TEST_REDIS_URL, delete_prefix, new_prefix

pytest_plugins = [
    "tests.pg_fixtures",
    "tests.model_fixtures",
    "tests.mlflow_model_fixtures",
    "tests.serving_fixtures",
    "tests.registry_fixtures",
    "tests.training_fixtures",
    "tests.cluster_fixtures",
]


@pytest.fixture(autouse=True, scope="session")
def _no_server_at_the_default_address() -> Iterator[None]:
    """``forge predict`` and ``forge search`` ask a server at FORGE_SERVE_HOST:PORT when
    one answers: point them at a port that refuses (bound, never listening), so that no
    test reaches a ``forge serve`` someone runs on this machine. Tests of the server set
    their own port; workers started by tests listen on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        changes = {
            "FORGE_SERVE_PORT": str(sock.getsockname()[1]),
            # Workers the tests start pick a free port for /health and /metrics: a
            # `forge worker` someone runs on this machine holds the default one.
            "FORGE_HTTP_PORT": "0",
        }
        before = {name: os.environ.get(name) for name in changes}
        os.environ.update(changes)
        yield
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(autouse=True)
def _logs_to_real_stderr() -> None:
    """Workers running in threads log to the process's stderr, never to a test's stdout."""
    configure_logging(Settings(log_format="console", log_level="INFO"), sys.__stderr__)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger and structlog back as they were (for tests that reconfigure)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"tests need a Redis server at {TEST_REDIS_URL}")
    yield client
    client.close()


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    value = new_prefix()
    yield value
    delete_prefix(redis_client, value)


@pytest.fixture
def settings(prefix: str, tmp_path: Path) -> Settings:
    """Fast timings so retries, redeliveries and reclaims happen within a test."""
    return Settings(
        redis_url=TEST_REDIS_URL,
        stream_prefix=prefix,
        home_dir=tmp_path / "forge-home",
        read_block_s=0.05,
        retry_backoff_initial_s=0.001,
        retry_backoff_max_s=0.01,
        redeliver_delay_s=0.01,
        claim_min_idle_s=30.0,
        reclaim_interval_s=0.1,
        drain_timeout_s=10.0,
    )


@pytest.fixture
def ctx(settings: Settings, redis_client: redis.Redis) -> Iterator[Context]:
    context = Context(settings=settings, redis=redis_client, metrics=Metrics(gpu=False))
    yield context
    context.close()


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, ctx: Context) -> Context:
    """The environment a ``forge`` command reads, pointing at ``ctx``'s Redis and prefix."""
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    monkeypatch.setenv("FORGE_STREAM_PREFIX", ctx.settings.stream_prefix)
    monkeypatch.setenv("FORGE_HOME", str(ctx.settings.home_dir))
    return ctx
