"""``forge watch``: data collection against real Redis, rendering as a pure function."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from rich.console import Console
from rich.text import Text

from forge.cli import cmd_watch
from forge.events import Completion, ErrorInfo, Event, Status, TrainingProgress, encode, new_id
from forge.keys import Keys
from forge.observability.status import GroupStatus, Snapshot, StreamStatus
from forge.runtime.context import Context
from forge.watch import WatchData, WatchOptions, collect, render
from forge.watch.collect import CompletionRow, Throughput, TrainingRow, server_time_s, throughput
from tests.support.cli import run_cli
from tests.support.events import new_data, publish
from tests.support.redis_helpers import TEST_REDIS_URL

# ---------------------------------------------------------------------- seeding


def _add(client: redis.Redis, stream: str, event: Event, at_ms: int | None = None) -> str:
    entry_id = f"{at_ms}-*" if at_ms is not None else "*"
    added: Any = client.xadd(stream, {b"event": encode(event)}, id=entry_id)
    return str(added.decode())


def _completion(
    keys: Keys, source_id: str | None, status: Status = "succeeded", source_stream: str = ""
) -> Completion:
    failed = status != "succeeded"
    return Completion(
        id=new_id(),
        source_id=source_id,
        source_stream=source_stream or keys.new_data,
        source_entry_id="1-0",
        status=status,
        worker="host-1-abc",
        error=ErrorInfo(type="ValueError", message=f"{source_id} broke") if failed else None,
    )


def _progress(source_id: str, epoch: int, epochs: int = 10, model: str = "clf") -> TrainingProgress:
    return TrainingProgress(
        id=new_id(), model=model, source_id=source_id, epoch=epoch, epochs=epochs, loss=0.5 / epoch,
        metric=0.8, eta_s=30.0,
    )  # fmt: skip


@pytest.fixture
def seeded(ctx: Context) -> Context:
    """Completions old and new, trainings running and finished, a dead letter, a backlog."""
    client, keys = ctx.redis, ctx.keys
    now_ms = int(server_time_s(client) * 1000)
    hour_ago = now_ms - 3_600_000
    # Trainings: only run-live is still running.
    _add(client, keys.training_progress, _progress("run-stale", 2), at_ms=hour_ago)
    _add(client, keys.completions, _completion(keys, "old-1"), at_ms=hour_ago)
    _add(client, keys.completions, _completion(keys, "old-2"), at_ms=hour_ago)
    for epoch in (1, 2, 3):
        _add(client, keys.training_progress, _progress("run-live", epoch))
    _add(client, keys.training_progress, _progress("run-done", 4, model="reg"))
    _add(client, keys.training_progress, _progress("run-marked", 5, model="reg"))
    client.set(keys.done(keys.training_requests, "run-marked"), b"{}")
    # Recent completions: 3 succeeded, 1 failed, 1 dead-lettered (a training's).
    for name in ("ok-1", "ok-2", "ok-3"):
        _add(client, keys.completions, _completion(keys, name))
    _add(client, keys.completions, _completion(keys, "bad-1", "failed"))
    _add(
        client,
        keys.completions,
        _completion(keys, "run-done", "dead-lettered", source_stream=keys.training_requests),
    )
    # A backlog on new-data: 3 entries, 1 delivered and not acked.
    ctx.broker.ensure_groups(keys.input_streams)
    for i in range(3):
        publish(client, keys.new_data, new_data(f"nd-{i}"))
    client.xreadgroup(keys.group, "watcher-test", {keys.new_data: ">"}, count=1)
    client.xadd(keys.dead_letter, {b"event": b"{}"})
    return ctx


# ---------------------------------------------------------------------- collection


def test_collect_reads_every_part_of_the_view(seeded: Context) -> None:
    data = collect(seeded.redis, seeded.keys, WatchOptions(rows=4, window_s=60))
    assert [r.source_id for r in data.completions] == ["run-done", "bad-1", "ok-3", "ok-2"]
    assert data.completions[1].error == "ValueError: bad-1 broke"
    assert data.completions[0].source_stream == "training-requests"
    assert data.throughput.count == 5
    assert data.throughput.by_status == {"succeeded": 3, "failed": 1, "dead-lettered": 1}
    assert data.throughput.per_s == pytest.approx(5 / 60)
    assert [(t.source_id, t.epoch) for t in data.trainings] == [("run-live", 3)]
    assert data.status.dead_letter_depth == 1
    new_data_status = next(s for s in data.status.streams if s.stream == seeded.keys.new_data)
    group = new_data_status.group(seeded.keys.group)
    assert group is not None
    assert (new_data_status.length, group.lag, group.pending) == (3, 2, 1)


def test_a_completion_without_an_event_id_is_shown_and_counted(ctx: Context) -> None:
    # A malformed event's completion has a null source_id: it is a dead letter like
    # any other, not an unreadable entry.
    _add(ctx.redis, ctx.keys.completions, _completion(ctx.keys, None, "dead-lettered"))
    data = collect(ctx.redis, ctx.keys, WatchOptions())
    assert [(r.source_id, r.status) for r in data.completions] == [("-", "dead-lettered")]
    assert data.throughput.by_status == {"dead-lettered": 1}
    assert "dead-lettered" in _plain(render(data, plain=True))


def test_a_window_over_the_scan_limit_measures_the_span_it_read(ctx: Context) -> None:
    keys = ctx.keys
    now_ms = int(server_time_s(ctx.redis) * 1000)
    for i in range(5):  # one every 100 ms, ending 1 s ago
        _add(ctx.redis, keys.completions, _completion(keys, f"c{i}"), at_ms=now_ms - 1400 + i * 100)
    now_s = server_time_s(ctx.redis)
    rate = throughput(ctx.redis, keys, now_s, WatchOptions(window_s=60, max_scan=3))
    assert rate.capped
    assert rate.count == 3
    # The 3 newest span from the third entry's time to now.
    assert rate.span_s == pytest.approx(now_s - (now_ms - 1200) / 1000, abs=0.01)


def test_empty_deployment_collects_without_errors(ctx: Context) -> None:
    data = collect(ctx.redis, ctx.keys, WatchOptions())
    assert data.completions == []
    assert data.trainings == []
    assert data.throughput.count == 0
    text = _plain(render(data, plain=True))
    assert "completions: none yet" in text
    assert "running trainings: none" in text


# ---------------------------------------------------------------------- the command


@pytest.fixture
def watch_env(monkeypatch: pytest.MonkeyPatch, seeded: Context) -> Context:
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    monkeypatch.setenv("FORGE_STREAM_PREFIX", seeded.settings.stream_prefix)
    monkeypatch.setenv("FORGE_HOME", str(seeded.settings.home_dir))
    return seeded


def test_watch_once_prints_one_plain_snapshot(
    capsys: pytest.CaptureFixture[str], watch_env: Context
) -> None:
    code, out, err = run_cli(capsys, "watch", "--once", "--rows", "10", "--window-s", "60")
    assert code == 0, err
    assert "\x1b[" not in out  # not a terminal: no colour codes, no cursor movement
    assert all(line == line.rstrip() for line in out.splitlines())
    assert "0.1 completions/s (5 in 1m00s: 1 dead-lettered, 1 failed, 3 succeeded)" in out
    assert "dead letters: 1 (replays 0)" in out
    lines = out.splitlines()
    row = next(line for line in lines if watch_env.keys.new_data in line)
    assert row.split() == [watch_env.keys.new_data, "3", "2", "1", "1"]
    training = next(line for line in lines if "run-live" in line)
    assert "3/10" in training
    assert "[#######-----------------]  30%" in training
    assert not any("run-stale" in line or "run-marked" in line for line in lines)
    failed = next(line for line in lines if "bad-1" in line)
    assert "failed" in failed
    assert "ValueError: bad-1 broke" in failed
    # Newest first.
    order = [next(i for i, line in enumerate(lines) if f" {n} " in line) for n in ("ok-3", "ok-1")]
    assert order == sorted(order)
    assert "old-1" in out  # outside the window, but among the newest 10


def test_watch_live_refreshes_until_interrupted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, watch_env: Context
) -> None:
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt  # what Ctrl-C does to the refresh loop

    monkeypatch.setattr(time, "sleep", sleep)
    code, out, _ = run_cli(capsys, "watch", "--interval-s", "0.5")
    assert code == 0
    assert sleeps == [0.5, 0.5]
    assert "run-live" in out


def test_live_view_keeps_the_last_frame_while_redis_is_away() -> None:
    last = Text("the last good view")
    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    kept, frame = cmd_watch._frame(dead, Keys(), WatchOptions(), last, 2.0)
    assert kept is last
    text = _plain(frame)
    assert "Redis unreachable" in text
    assert "retrying every 2s" in text
    assert "the last good view" in text


@pytest.mark.parametrize("argv", [["--interval-s", "0"], ["--rows", "-1"], ["--window-s", "x"]])
def test_watch_rejects_bad_arguments(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, _, err = run_cli(capsys, "watch", "--once", *argv)
    assert code == 2
    assert err.count("\n") == 1


def test_watch_unreachable_redis_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("FORGE_HOME", str(tmp_path))
    code, _, err = run_cli(capsys, "watch", "--once")
    assert code == 1
    assert err.startswith("forge: error: cannot reach Redis")
    assert err.count("\n") == 1


# ---------------------------------------------------------------------- rendering


def _data(**changes: object) -> WatchData:
    now = time.time()
    stream = StreamStatus("forge:new-data", 120, [GroupStatus("forge", 7, 3, 2, "1-0")])
    values: dict[str, object] = {
        "now_s": now,
        "group": "forge",
        "completions": [
            CompletionRow(
                f"{int(now * 1000)}-0", "new-data", "ev-ok", "succeeded", handler_s=0.012
            ),
            CompletionRow(
                f"{int(now * 1000)}-1", "new-data", "ev-fail", "failed", 2, error="E: [red]x"
            ),
            CompletionRow(
                f"{int(now * 1000)}-2", "training-requests", "ev-dead", "dead-lettered", 3
            ),
        ],
        "throughput": Throughput(60.0, 120, {"succeeded": 118, "failed": 2}),
        "status": Snapshot([stream, StreamStatus("forge:training-requests", 0)], 4, 1),
        "trainings": [TrainingRow("clf", "req-9", 5, 20, 0.25, None, 95.0, now - 3)],
    }
    values.update(changes)
    return WatchData(**values)  # type: ignore[arg-type]


def _plain(renderable: object) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(renderable)
    return out.getvalue()


def test_render_shows_every_section() -> None:
    text = _plain(render(_data(), plain=True))
    assert "2.0 completions/s (120 in 1m00s: 2 failed, 118 succeeded)" in text
    assert "dead letters: 4 (replays 1)" in text
    stream_line = next(line for line in text.splitlines() if "forge:new-data" in line)
    assert stream_line.split() == ["forge:new-data", "120", "7", "3", "2"]
    missing_group = next(line for line in text.splitlines() if "forge:training-requests" in line)
    assert missing_group.split()[1:] == ["0", "-", "-", "-"]
    training = next(line for line in text.splitlines() if "req-9" in line)
    assert "[######------------------]  25%" in training
    assert "5/20" in training
    assert "0.2500" in training
    assert "1m35s" in training
    assert "3.0s ago" in training
    assert "12ms" in text
    assert "E: [red]x" in text  # data, not markup


def test_render_colours_statuses() -> None:
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=True, color_system="standard").print(
        render(_data())
    )
    text = out.getvalue()
    assert "\x1b[32msucceeded" in text  # green
    assert "\x1b[33mfailed" in text  # yellow
    assert "\x1b[31mdead-lettered" in text  # red


def test_render_live_mode_draws_a_progress_bar() -> None:
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=True).print(render(_data()))
    assert "━" in out.getvalue()  # rich's bar, not the text one
    assert "[######" not in out.getvalue()
