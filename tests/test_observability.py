"""Logging, metrics and the health/metrics HTTP endpoint."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

import pytest
import redis
import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from forge.errors import ConfigError
from forge.events import ErrorInfo
from forge.keys import Keys
from forge.observability.http import HealthCheck, HealthReport, start_http_server
from forge.observability.logging import configure_logging, redact_text
from forge.observability.metrics import (
    GpuCollector,
    Metrics,
    StreamStatsCollector,
    in_multiprocess_mode,
    mark_worker_dead,
    multiprocess_env,
    prepare_multiprocess_dir,
    render_multiprocess,
)
from forge.observability.status import snapshot
from forge.runtime.broker import StreamBroker
from forge.runtime.deadletter import DeadLetterQueue, build_record
from forge.runtime.entries import Entry
from forge.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- fixtures


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    conn = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=5)
    try:
        conn.ping()
    except redis.ConnectionError:
        pytest.skip("needs Redis on 127.0.0.1:6379")
    yield conn
    conn.close()


@pytest.fixture
def keys(client: redis.Redis) -> Iterator[Keys]:
    prefix = f"test:{uuid4().hex}:"
    yield Keys(prefix=prefix, group="forge")
    doomed = list(client.scan_iter(match=f"{prefix}*"))
    if doomed:
        client.delete(*doomed)


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# -------------------------------------------------------------------------- metrics


def test_render_contains_every_metric_name() -> None:
    metrics = Metrics(gpu=False)
    metrics.init_streams(["new-data"])
    metrics.events_received_total.labels(stream="new-data").inc()
    metrics.handler_duration_seconds.labels(stream="new-data").observe(0.02)
    metrics.embedding_cache_hits_total.labels(model="m").inc()
    metrics.embedding_cache_misses_total.labels(model="m").inc()
    metrics.infrastructure_errors_total.labels(component="postgres").inc()

    body, content_type = metrics.render()

    assert content_type == CONTENT_TYPE_LATEST
    text = body.decode()
    for name in (
        "forge_events_received_total",
        "forge_events_processed_total",
        "forge_retries_total",
        "forge_dead_lettered_total",
        "forge_redeliveries_total",
        "forge_reclaimed_total",
        "forge_handler_duration_seconds_bucket",
        "forge_events_in_progress",
        "forge_infrastructure_errors_total",
        "forge_embedding_cache_hits_total",
        "forge_embedding_cache_misses_total",
    ):
        assert name in text, name
    assert 'outcome="dead-lettered"' in text
    assert 'le="3600.0"' in text


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(gpu=False), Metrics(gpu=False)
    first.retries_total.labels(stream="s").inc()
    assert _value(first, "forge_retries_total", stream="s") == 1.0
    assert _value(second, "forge_retries_total", stream="s") is None


def test_stream_stats_report_lag_pending_length(client: redis.Redis, keys: Keys) -> None:
    stream = keys.training_requests
    client.xgroup_create(stream, keys.group, id="0", mkstream=True)
    for i in range(5):
        client.xadd(stream, {"event": f"{i}"})
    client.xreadgroup(keys.group, "consumer-1", {stream: ">"}, count=3)
    client.xadd(keys.dead_letter, {"event": "x"})
    metrics = Metrics(gpu=False)
    metrics.watch_streams(lambda: client, keys, keys.input_streams)

    group = {"stream": "training-requests", "group": keys.group}
    assert _value(metrics, "forge_stream_length", stream="training-requests") == 5
    assert _value(metrics, "forge_stream_pending", **group) == 3
    assert _value(metrics, "forge_stream_lag", **group) == 2
    assert _value(metrics, "forge_stream_consumers", **group) == 1
    assert _value(metrics, "forge_dead_letter_depth") == 1
    # new-data was never created: zero length, no groups.
    assert _value(metrics, "forge_stream_length", stream="new-data") == 0
    assert _value(metrics, "forge_stream_pending", stream="new-data", group=keys.group) is None


def test_dead_letter_replays_are_counted_from_redis(
    client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    # Replays are made by `forge dlq replay`, a process nobody scrapes: a worker's
    # /metrics must count them all the same, as `forge status` does.
    metrics = Metrics(gpu=False)
    metrics.watch_streams(lambda: client, keys, keys.input_streams)
    assert _value(metrics, "forge_dead_letter_replays_total") == 0
    broker = StreamBroker(client, keys, maxlen=1000)
    entry = Entry(keys.new_data, "1700000000000-0", {b"event": b'{"id": "e1"}'})
    record = build_record(entry, ErrorInfo(type="E", message="m"), group=keys.group, consumer="c")
    broker.publish(keys.dead_letter, record)
    dlq = DeadLetterQueue(broker)  # another process's, as far as ``metrics`` knows
    dlq.replay(dlq.select())

    assert snapshot(client, keys).dead_letter_replays == 1
    assert _value(metrics, "forge_dead_letter_replays_total") == 1
    # Still a counter, so that rate() and increase() work; and exposed once under the
    # supervisor too, where the parent reports it.
    for body in (metrics.render()[0], render_multiprocess(tmp_path, metrics)[0]):
        (family,) = [
            f
            for f in text_string_to_metric_families(body.decode())
            if f.name == "forge_dead_letter_replays"
        ]
        assert family.type == "counter"
        assert [s.value for s in family.samples] == [1.0]


def test_stream_stats_omit_unknown_lag(client: redis.Redis, keys: Keys) -> None:
    stream = keys.new_data
    ids = [client.xadd(stream, {"event": f"{i}"}) for i in range(3)]
    client.xgroup_create(stream, keys.group, id="0")
    client.xdel(stream, ids[1])  # a tombstone makes Redis 7 report lag as nil
    if client.xinfo_groups(stream)[0]["lag"] is not None:
        pytest.skip("this Redis computes lag despite deletions")
    metrics = Metrics(gpu=False)
    metrics.watch_streams(lambda: client, keys, [stream])

    group = {"stream": "new-data", "group": keys.group}
    assert _value(metrics, "forge_stream_lag", **group) is None
    assert _value(metrics, "forge_stream_pending", **group) == 0


def test_stream_stats_with_unreachable_redis_emit_nothing() -> None:
    # No retries: redis-py's default backoff would only slow the test down.
    dead = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    metrics = Metrics(gpu=False)
    collector = metrics.watch_streams(lambda: dead, Keys(), Keys().input_streams)

    with structlog.testing.capture_logs() as logs:
        assert list(collector.collect()) == []
        body, _ = metrics.render()  # a second failing scrape, through the registry

    assert b"forge_stream_" not in body
    assert b"forge_dead_letter_depth" not in body
    assert _value(metrics, "forge_infrastructure_errors_total", component="redis") == 2
    assert [entry["log_level"] for entry in logs] == ["warning", "debug"]


def test_stream_stats_survive_a_failing_factory() -> None:
    def factory() -> redis.Redis:
        raise RuntimeError("no client")

    collector = StreamStatsCollector(factory, Keys(), Keys().input_streams)
    assert list(collector.collect()) == []


# ---------------------------------------------------------------------------- GPU


class _FakeNvml:
    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init = fail_init
        self.init_calls = 0

    def nvmlInit(self) -> None:  # noqa: N802 - mirrors pynvml
        self.init_calls += 1
        if self.fail_init:
            raise OSError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetUtilizationRates(self, _handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=42, memory=10)

    def nvmlDeviceGetMemoryInfo(self, _handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(used=1024, total=4096, free=3072)


def _samples(collector: GpuCollector) -> dict[str, float]:
    return {s.name: s.value for family in collector.collect() for s in family.samples}


def test_gpu_collector_without_nvml_emits_nothing_and_inits_once() -> None:
    nvml = _FakeNvml(fail_init=True)
    collector = GpuCollector(nvml)
    assert _samples(collector) == {}
    assert _samples(collector) == {}
    assert nvml.init_calls == 1


def test_gpu_collector_reports_each_device() -> None:
    samples = _samples(GpuCollector(_FakeNvml()))
    assert samples == {
        "forge_gpu_utilization_ratio": 0.42,
        "forge_gpu_memory_used_bytes": 1024.0,
        "forge_gpu_memory_total_bytes": 4096.0,
    }


def test_gpu_collector_with_real_nvml_never_raises() -> None:
    # Empty on a machine without a GPU; the three families where NVML works.
    names = {family.name for family in GpuCollector().collect()}
    assert names in (
        set(),
        {
            "forge_gpu_utilization_ratio",
            "forge_gpu_memory_used_bytes",
            "forge_gpu_memory_total_bytes",
        },
    )


# ------------------------------------------------------------------ multi-process


def _run_child(code: str, metrics_dir: Path) -> str:
    env = multiprocess_env(metrics_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


_CHILD = """
    import os
    from forge.observability.metrics import Metrics, in_multiprocess_mode
    assert in_multiprocess_mode()
    m = Metrics(gpu=False)
    m.events_received_total.labels(stream="new-data").inc(3)
    m.events_in_progress.labels(stream="new-data").inc()
    m.handler_duration_seconds.labels(stream="new-data").observe(0.2)
    m.infrastructure_errors_total.labels(component="redis").inc()
    print(os.getpid())
"""


def _families(body: bytes) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.name not in out, f"family {family.name} exposed twice"
        out[family.name] = {
            (s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples
        }
    return out


def test_multiprocess_render_sums_children_and_parent(tmp_path: Path) -> None:
    assert not in_multiprocess_mode()  # the test process keeps values in memory
    metrics_dir = prepare_multiprocess_dir(tmp_path / "metrics")
    pids = [int(_run_child(_CHILD, metrics_dir)) for _ in range(2)]
    parent = Metrics(gpu=False)
    parent.infrastructure_errors_total.labels(component="redis").inc()

    body, content_type = render_multiprocess(metrics_dir, parent)

    assert content_type == CONTENT_TYPE_LATEST
    fams = _families(body)
    stream = (("stream", "new-data"),)
    assert fams["forge_events_received"][("forge_events_received_total", stream)] == 6
    redis_errors = (("component", "redis"),)
    assert (
        fams["forge_infrastructure_errors"][("forge_infrastructure_errors_total", redis_errors)]
        == 3
    )
    assert (
        fams["forge_handler_duration_seconds"][("forge_handler_duration_seconds_count", stream)]
        == 2
    )
    assert fams["forge_events_in_progress"][("forge_events_in_progress", stream)] == 2
    for pid in pids:
        mark_worker_dead(metrics_dir, pid)
    fams = _families(render_multiprocess(metrics_dir, parent)[0])
    assert fams["forge_events_in_progress"].get(("forge_events_in_progress", stream), 0) == 0
    assert fams["forge_events_received"][("forge_events_received_total", stream)] == 6


def test_multiprocess_parent_in_multiprocess_mode_counts_once(tmp_path: Path) -> None:
    metrics_dir = prepare_multiprocess_dir(tmp_path / "metrics")
    _run_child(_CHILD, metrics_dir)
    parent_code = """
        import os, sys
        from pathlib import Path
        from forge.observability.metrics import Metrics, render_multiprocess
        parent = Metrics(gpu=False)
        parent.infrastructure_errors_total.labels(component="redis").inc()
        body, _ = render_multiprocess(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]), parent)
        sys.stdout.write(body.decode())
    """
    fams = _families(_run_child(parent_code, metrics_dir).encode())
    redis_errors = (("component", "redis"),)
    assert (
        fams["forge_infrastructure_errors"][("forge_infrastructure_errors_total", redis_errors)]
        == 2
    )


def test_prepare_multiprocess_dir_removes_stale_files(tmp_path: Path) -> None:
    (tmp_path / "counter_123.db").write_bytes(b"old")
    (tmp_path / "keep.txt").write_text("mine")
    prepare_multiprocess_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


# --------------------------------------------------------------------------- HTTP


def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _metrics_body() -> tuple[bytes, str]:
    return b"forge_up 1\n", CONTENT_TYPE_LATEST


def test_http_health_ok_and_metrics() -> None:
    healthy = HealthReport(ok=True, checks={"redis": "ok"})
    with start_http_server("127.0.0.1", 0, lambda: healthy, _metrics_body) as server:
        assert server.port > 0
        status, headers, body = _get(server.port, "/health")
        assert status == 200
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"status": "ok", "checks": {"redis": "ok"}}
        assert "Python" not in headers["Server"]

        status, headers, body = _get(server.port, "/metrics")
        assert (status, headers["Content-Type"], body) == (
            200,
            CONTENT_TYPE_LATEST,
            b"forge_up 1\n",
        )

        status, headers, body = _get(server.port, "/health", method="HEAD")
        assert (status, body) == (200, b"")


def test_http_unhealthy_unknown_and_wrong_method() -> None:
    sick = HealthReport(ok=False, reason="redis unreachable: ConnectionError")
    with start_http_server("127.0.0.1", 0, lambda: sick, _metrics_body) as server:
        status, _, body = _get(server.port, "/health")
        assert status == 503
        assert json.loads(body)["status"] == "unhealthy"
        assert json.loads(body)["reason"] == "redis unreachable: ConnectionError"
        assert _get(server.port, "/")[0] == 404
        assert _get(server.port, "/metrics/../settings")[0] == 404
        status, headers, _ = _get(server.port, "/metrics", method="POST")
        assert (status, headers["Allow"]) == (405, "GET, HEAD")


def test_http_failing_callbacks_reveal_nothing() -> None:
    def health() -> HealthReport:
        raise RuntimeError("redis://admin:hunter2@db")

    def metrics() -> tuple[bytes, str]:
        raise RuntimeError("redis://admin:hunter2@db")

    with start_http_server("127.0.0.1", 0, health, metrics) as server:
        status, _, body = _get(server.port, "/health")
        assert status == 503
        assert b"hunter2" not in body
        assert json.loads(body)["reason"] == "health check failed: RuntimeError"
        status, _, body = _get(server.port, "/metrics")
        assert status == 500
        assert b"hunter2" not in body


def test_http_stop_releases_the_port() -> None:
    server = start_http_server("127.0.0.1", 0, lambda: HealthReport(ok=True), _metrics_body)
    server.stop()
    server.stop()
    with pytest.raises(OSError):  # noqa: PT011 - refused connections vary by platform
        _get(server.port, "/health")


class _Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_health_check_states() -> None:
    clock = _Clock()
    failures: list[Exception] = []

    def ping() -> None:
        if failures:
            raise failures[0]

    check = HealthCheck(ping, loop_heartbeat_max_age_s=30, clock=clock)
    assert check() == HealthReport(True, "", {"redis": "ok", "worker_loop": "ok"})

    clock.now_s += 31
    report = check()
    assert (report.ok, report.reason) == (False, "worker loop stalled for 31s")

    check.beat()
    assert check().ok
    failures.append(redis.ConnectionError("Error connecting to redis://u:pw@host"))
    report = check()
    assert (report.ok, report.reason) == (False, "redis unreachable: ConnectionError")
    assert report.checks["redis"] == "unreachable"


# ------------------------------------------------------------------------ logging


def _json_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line]


@pytest.mark.usefixtures("restore_logging")
def test_json_logs_have_fields_and_redacted_urls() -> None:
    buffer = io.StringIO()
    configure_logging(Settings(log_format="json", log_level="debug"), buffer)
    log = structlog.get_logger("forge.test")

    log.info("connecting", url="redis://forge:s3cret@redis:6379/0", attempt=1)
    log.debug("dsn is %s", "postgresql://app:pa55@db/forge")
    try:
        raise ConnectionError("cannot reach mlflow at http://u:tok3n@mlflow:5000")
    except ConnectionError:
        log.exception("boom")
    logging.getLogger("thirdparty").warning("via stdlib redis://:pw0rd@h")

    text = buffer.getvalue()
    for secret in ("s3cret", "pa55", "tok3n", "pw0rd"):
        assert secret not in text
    first, second, third, fourth = _json_lines(buffer)
    assert first["url"] == "redis://forge:***@redis:6379/0"
    assert (first["event"], first["level"], first["logger"]) == ("connecting", "info", "forge.test")
    assert first["timestamp"].endswith("Z")
    assert second["event"] == "dsn is postgresql://app:***@db/forge"
    assert "Traceback" in third["exception"]
    assert "http://u:***@mlflow:5000" in third["exception"]
    assert (fourth["logger"], fourth["level"]) == ("thirdparty", "warning")


@pytest.mark.usefixtures("restore_logging")
def test_auto_format_is_json_off_a_tty_and_level_filters() -> None:
    buffer = io.StringIO()
    configure_logging(Settings(log_format="auto", log_level="WARNING"), buffer)
    log = structlog.get_logger("forge.test")
    log.info("hidden")
    log.warning("shown")
    assert [entry["event"] for entry in _json_lines(buffer)] == ["shown"]


@pytest.mark.usefixtures("restore_logging")
def test_console_format_and_idempotent_configure() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(Settings(log_format="json"), first)
    configure_logging(Settings(log_format="console"), second)
    structlog.get_logger("forge.test").info("hello", url="redis://a:b@c")

    assert first.getvalue() == ""
    lines = second.getvalue().splitlines()
    assert len(lines) == 1
    assert "hello" in lines[0]
    assert "redis://a:***@c" in lines[0]
    assert not lines[0].startswith("{")
    assert "\x1b[" not in lines[0]  # no colours off a terminal


@pytest.mark.usefixtures("restore_logging")
def test_unknown_log_level_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown log level"):
        configure_logging(Settings(log_level="chatty"), io.StringIO())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        (
            "see redis://:pw@h and postgres://a:b@c/d.",
            "see redis://:***@h and postgres://a:***@c/d.",
        ),
        ("no credentials: http://host/path", "no credentials: http://host/path"),
        ("user only: redis://user@host", "user only: redis://user@host"),
        ("bad port x://u:pw@h:notaport/p", "bad port x://u:***@h:notaport/p"),
        ("'redis://u:p@ss@h'", "'redis://u:***@h'"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected
