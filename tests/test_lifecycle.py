"""Worker processes dying, draining and holding leases, against a real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from forge.events import NewData
from forge.observability.metrics import Metrics
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, HandlerSpec, Message
from forge.runtime.worker import Worker
from forge.settings import Settings
from tests.support.events import new_data, publish
from tests.support.metrics import sample
from tests.support.redis_helpers import TEST_REDIS_URL, running, wait_for
from tests.support.workers import completions, pending


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        REDIS_URL=TEST_REDIS_URL,
        FORGE_STREAM_PREFIX=settings.stream_prefix,
        FORGE_HOME=str(settings.home_dir),
        FORGE_READ_BLOCK_S="0.05",
        FORGE_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@pytest.fixture
def spawn(settings: Settings) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **env: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "forge.cli.main", "worker", *args]
        cmd += ["--consumers", "tests.support.consumers:register_slow"]
        proc = subprocess.Popen(
            cmd, env=worker_env(settings, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def started(ctx: Context) -> list[bytes]:
    return ctx.redis.lrange(f"{ctx.keys.prefix}started", 0, -1)


def handled(ctx: Context) -> list[bytes]:
    return ctx.redis.lrange(f"{ctx.keys.prefix}handled", 0, -1)


def quick_worker(ctx: Context) -> Worker:
    registry = HandlerRegistry()
    registry.register(HandlerSpec("new-data", NewData, lambda messages: None))
    return Worker(ctx, registry)


def test_entries_of_a_sigkilled_worker_are_reclaimed(spawn, ctx: Context) -> None:  # type: ignore[no-untyped-def]
    for i in range(3):
        publish(ctx.redis, ctx.keys.new_data, new_data(f"e{i}"))
    victim = spawn(TEST_HANDLER_SLEEP_S="60")
    wait_for(lambda: len(started(ctx)) == 3, timeout_s=60)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert pending(ctx) == 3

    ctx = replace(ctx, settings=ctx.settings.replace(claim_min_idle_s=0.5))
    with running(quick_worker(ctx)):
        wait_for(lambda: len(completions(ctx)) == 3, timeout_s=60)
    done = completions(ctx)
    assert sorted(c.source_id for c in done) == ["e0", "e1", "e2"]
    assert {c.deliveries for c in done} == {2}
    assert {c.status for c in done} == {"succeeded"}
    assert pending(ctx) == 0
    assert sample(ctx.metrics, "forge_reclaimed_total", stream="new-data") == 3


def test_lease_renewal_keeps_a_slow_handlers_entry(
    settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Renewals come every claim_min_idle_s / 3, so a renewal thread may fall a whole
    # second behind on a loaded machine before the entry goes stale.
    threshold_s = 1.5
    fast_reclaim = settings.replace(claim_min_idle_s=threshold_s, reclaim_interval_s=0.05)
    calls: list[str] = []
    reclaim_attempts: list[float] = []

    def slow(messages: Sequence[Message[NewData]]) -> None:
        calls.extend(m.event.id for m in messages)
        began = time.monotonic()
        # Hold the entry until the other worker has tried to reclaim it at a moment when,
        # without renewals, it would have been idle for twice the threshold (or has taken
        # it: a second call, which fails the test).
        wait_for(
            lambda: len(calls) > 1 or any(t > began + 2 * threshold_s for t in reclaim_attempts),
            timeout_s=60,
        )

    workers = []
    for _ in range(2):
        ctx = Context(settings=fast_reclaim, redis=redis_client, metrics=Metrics(gpu=False))
        registry = HandlerRegistry()
        registry.register(HandlerSpec("new-data", NewData, slow))
        workers.append(Worker(ctx, registry))
    for worker in workers:  # whichever is not busy with the entry tries to reclaim it
        monkeypatch.setattr(
            worker.ctx.broker,
            "claim_stale",
            _recorded(worker.ctx.broker.claim_stale, reclaim_attempts),
        )
    workers[0].ctx.broker.ensure_groups(workers[0].streams)
    publish(redis_client, workers[0].keys.new_data, new_data("long"))
    with running(workers[0]), running(workers[1]):
        wait_for(lambda: len(completions(workers[0].ctx)) >= 1, timeout_s=60)
    (done,) = completions(workers[0].ctx)
    assert calls == ["long"]
    assert done.deliveries == 1
    reclaimed = [sample(w.ctx.metrics, "forge_reclaimed_total", stream="new-data") for w in workers]
    assert reclaimed == [0, 0]


def _recorded(claim_stale: Callable[..., Any], attempts: list[float]) -> Callable[..., Any]:
    def recorded(*args: Any, **kwargs: Any) -> Any:
        attempts.append(time.monotonic())
        return claim_stale(*args, **kwargs)

    return recorded


def test_sigterm_finishes_in_flight_work_and_loses_nothing(spawn, ctx: Context) -> None:  # type: ignore[no-untyped-def]
    for i in range(6):
        publish(ctx.redis, ctx.keys.new_data, new_data(f"e{i}"))
    proc = spawn(TEST_HANDLER_SLEEP_S="1.0", MAX_BATCH_SIZE="2")
    wait_for(lambda: len(started(ctx)) >= 1, timeout_s=60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert started(ctx) == handled(ctx)  # the batch in flight finished
    assert len(completions(ctx)) == len(handled(ctx))
    assert pending(ctx) == 0  # and was acked

    with running(quick_worker(ctx)):
        wait_for(lambda: len(completions(ctx)) == 6, timeout_s=60)
    ids = sorted(c.source_id for c in completions(ctx))
    assert ids == [f"e{i}" for i in range(6)]


def test_drain_timeout_exits_zero_and_leaves_entries_pending(spawn, ctx: Context) -> None:  # type: ignore[no-untyped-def]
    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    proc = spawn(TEST_HANDLER_SLEEP_S="60", FORGE_DRAIN_TIMEOUT_S="0.5")
    lines = _drain_output(proc)
    wait_for(lambda: len(started(ctx)) == 1, timeout_s=60)
    proc.send_signal(signal.SIGTERM)
    # Well before the handler's 60 s are up: only the drain timeout can end it this soon.
    assert proc.wait(timeout=45) == 0
    wait_for(lambda: _logged(lines, "drain timed out, exiting"), timeout_s=10)
    assert handled(ctx) == []  # it did not wait for the handler
    assert pending(ctx) == 1  # not lost: another worker will reclaim it


def test_second_signal_forces_exit_without_losing_entries(spawn, ctx: Context) -> None:  # type: ignore[no-untyped-def]
    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    proc = spawn(TEST_HANDLER_SLEEP_S="60", FORGE_DRAIN_TIMEOUT_S="120")
    lines = _drain_output(proc)
    wait_for(lambda: len(started(ctx)) == 1, timeout_s=60)
    proc.send_signal(signal.SIGTERM)
    # Signals sent before the first is handled merge into one: wait until it was.
    wait_for(lambda: _logged(lines, "signal received, draining"), timeout_s=60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=45) == 128 + signal.SIGTERM
    assert pending(ctx) == 1


def _logged(lines: list[bytes], event: str) -> bool:
    return any(event.encode() in line for line in list(lines))


def _http_port(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") in {"http endpoint up", "supervisor started"}:
            return int(record["port"])
    raise AssertionError("worker never reported its HTTP port")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _drain_output(proc: subprocess.Popen[bytes]) -> list[bytes]:
    """Keep reading the child's output so it never blocks on a full pipe; returns the
    list the lines are collected into."""
    assert proc.stdout is not None
    lines: list[bytes] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True).start()
    return lines


@pytest.mark.parametrize("processes", [1, 2])
def test_health_and_metrics_endpoints(spawn, ctx: Context, processes: int) -> None:  # type: ignore[no-untyped-def]
    proc = spawn("--http-port", "0", "--processes", str(processes), TEST_HANDLER_SLEEP_S="0")
    port = _http_port(proc)
    _drain_output(proc)
    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    wait_for(lambda: len(completions(ctx)) == 1, timeout_s=60)
    status, body = _get(f"http://127.0.0.1:{port}/health")
    assert status == 200, body
    assert json.loads(body)["status"] == "ok"
    status, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    text = body.decode()
    assert 'forge_events_processed_total{outcome="succeeded",stream="new-data"} 1.0' in text
    assert "forge_stream_pending" in text
    assert "forge_dead_letter_depth" in text
    assert _get(f"http://127.0.0.1:{port}/config")[0] == 404
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_supervisor_restarts_a_dead_worker_process(spawn, ctx: Context, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc = spawn("--http-port", "0", "--processes", "2", TEST_HANDLER_SLEEP_S="60")
    port = _http_port(proc)
    lines = _drain_output(proc)
    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    wait_for(lambda: len(started(ctx)) == 1, timeout_s=60)
    info = ctx.redis.xinfo_consumers(ctx.keys.new_data, ctx.keys.group)
    holder = next(c for c in info if c["pending"] == 1)["name"].decode()
    os.kill(int(holder.split("-")[-2]), signal.SIGKILL)

    def restarted() -> bool:
        return sum(b"worker process started" in line for line in lines) >= 1

    wait_for(restarted, timeout_s=60)
    wait_for(lambda: _get(f"http://127.0.0.1:{port}/health")[0] == 200, timeout_s=60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert pending(ctx) == 1  # the killed worker's entry waits for reclaim
