"""Seeing the training queue: ``forge status`` and ``forge watch`` list queued and held
training requests with their priority, state and how long ago they were queued."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from forge.observability.training_queue import QueuedTraining, TrainingQueue, training_queue
from forge.runtime.context import Context
from forge.watch import WatchOptions, collect, render
from forge.watch.collect import server_time_s
from tests.support.cli import run_cli
from tests.test_watch import _data, _plain


def _request(event_id: str, model: str, priority: str) -> bytes:
    event = {
        "type": "training-request",
        "id": event_id,
        "model": model,
        "task": "classifier",
        "collection": "c",
        "priority": priority,
    }
    return msgspec.json.encode(event)


@pytest.fixture
def queue(ctx: Context) -> Context:
    """Per lane, with entry ids set seconds ago on Redis's clock (nothing races it):
    high: h-run (held by worker-a), h-gpu (held by worker-b, waiting for GPU memory),
    h-new; normal: n-1; low: l-1 and l-2."""
    client, keys = ctx.redis, ctx.keys
    now_ms = int(server_time_s(client) * 1000)
    lanes = {p: keys.lane(keys.training_requests, p) for p in ("high", "normal", "low")}
    ctx.broker.ensure_groups(lanes.values())

    def add(priority: str, event_id: str, model: str, ago_s: int) -> str:
        added: Any = client.xadd(
            lanes[priority],
            {b"event": _request(event_id, model, priority)},
            id=f"{now_ms - ago_s * 1000}-*",
        )
        return str(added.decode())

    add("high", "h-run", "clf", 300)
    gpu_entry = add("high", "h-gpu", "big", 240)
    add("high", "h-new", "clf", 5)
    add("normal", "n-1", "clf", 120)
    add("low", "l-1", "clf", 4000)
    add("low", "l-2", "clf", 60)
    client.xreadgroup(keys.group, "worker-a", {lanes["high"]: ">"}, count=1)
    client.xreadgroup(keys.group, "worker-b", {lanes["high"]: ">"}, count=1)
    record = {"model": "big", "need_bytes": 3 * 2**30, "free_bytes": 2**30, "gpus": 2}
    client.set(keys.admission_wait(lanes["high"], gpu_entry), msgspec.json.encode(record))
    return ctx


def test_the_queue_lists_held_then_queued_requests_best_priority_first(queue: Context) -> None:
    found = training_queue(queue.redis, queue.keys)
    assert found.queued == {"high": 1, "normal": 1, "low": 2}
    rows = [(t.event_id, t.priority, t.state, t.worker) for t in found.trainings]
    assert rows == [
        ("h-run", "high", "running", "worker-a"),
        ("h-gpu", "high", "waiting for GPU", "worker-b"),
        ("h-new", "high", "queued", ""),
        ("n-1", "normal", "queued", ""),
        ("l-1", "low", "queued", ""),
        ("l-2", "low", "queued", ""),
    ]
    by_id = {t.event_id: t for t in found.trainings}
    assert by_id["l-1"].waiting_s == pytest.approx(4000, abs=5)
    assert by_id["h-gpu"].detail == "needs 3072 MiB, most free on 2 GPU(s): 1024 MiB"
    assert by_id["h-run"].deliveries == 1
    assert by_id["h-gpu"].model == "big"


def test_an_empty_deployment_has_an_empty_queue(ctx: Context) -> None:
    assert training_queue(ctx.redis, ctx.keys) == TrainingQueue(
        [], dict.fromkeys(("high", "normal", "low"), 0)
    )


def test_forge_status_shows_the_training_queue(
    capsys: pytest.CaptureFixture[str], queue: Context, cli_env: Context
) -> None:
    code, out, err = run_cli(capsys, "status")
    assert code == 0, err
    assert "training queue: 1 high, 1 normal, 2 low queued" in out
    lines = out.splitlines()
    gpu = next(line for line in lines if "h-gpu" in line)
    assert gpu.split()[:7] == ["high", "waiting", "for", "GPU", "big", "h-gpu", "4m00s"]
    assert "needs 3072 MiB" in gpu
    low = next(line for line in lines if "l-1" in line)
    assert low.split()[:5] == ["low", "queued", "clf", "l-1", "1h06m"]

    code, out, _ = run_cli(capsys, "status", "--json")
    assert code == 0
    listed = json.loads(out)["training_queue"]
    assert listed["queued"] == {"high": 1, "normal": 1, "low": 2}
    assert [t["event_id"] for t in listed["trainings"]][:2] == ["h-run", "h-gpu"]


def test_forge_watch_shows_the_training_queue(
    capsys: pytest.CaptureFixture[str], queue: Context, cli_env: Context
) -> None:
    data = collect(queue.redis, queue.keys, WatchOptions())
    assert [t.event_id for t in data.queue.trainings][:3] == ["h-run", "h-gpu", "h-new"]
    code, out, err = run_cli(capsys, "watch", "--once")
    assert code == 0, err
    assert "training queue (1 high, 1 normal, 2 low queued)" in out
    running = next(line for line in out.splitlines() if "h-run" in line)
    assert running.split()[:4] == ["high", "running", "clf", "h-run"]
    assert "worker-a" in running
    assert "5m00s" in running


def test_render_shows_an_empty_queue_and_each_row() -> None:
    text = _plain(render(_data(), plain=True))
    assert "training queue (nothing queued): empty" in text
    row = QueuedTraining("low", "queued", "ev-1", "clf", "1-0", 75.0)
    text = _plain(render(_data(queue=TrainingQueue([row], {"low": 1})), plain=True))
    line = next(line for line in text.splitlines() if "ev-1" in line)
    assert line.split() == ["low", "queued", "clf", "ev-1", "1m15s", "-"]
