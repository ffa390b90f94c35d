"""``forge publish --wait``: each event's completion, read from the completions stream."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

from forge.errors import PermanentError
from forge.events import NewData
from forge.runtime.broker import StreamBroker
from forge.runtime.completion_wait import CompletionTimeout, wait_for_completions
from forge.runtime.context import Context
from forge.runtime.handlers import Message
from forge.runtime.worker import Worker
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.events import new_data
from tests.support.redis_helpers import TEST_REDIS_URL, running, wait_for
from tests.support.workers import completions, make_worker


def worker_that(ctx: Context, fails_with: type[Exception] | None = None) -> Worker:
    def handle(messages: Sequence[Message[NewData]]) -> None:
        if fails_with is not None:
            raise fails_with("no good")

    return make_worker(ctx, handle)


def test_wait_prints_each_completion_and_exits_0(
    capsys: pytest.CaptureFixture[str], cli_env: Context
) -> None:
    events = json.dumps([new_data("e1"), new_data("e2")])
    with running(worker_that(cli_env)):
        code, out, err = run_cli(capsys, "publish", "new-data", events, "--wait")
    assert code == 0, err
    entry_ids = [entry_id.decode() for entry_id, _ in cli_env.redis.xrange(cli_env.keys.new_data)]
    lines = sorted(line.split("  ") for line in out.splitlines())
    assert [line[:3] for line in lines] == [
        [entry_ids[0], "e1", "succeeded"],
        [entry_ids[1], "e2", "succeeded"],
    ]


@pytest.mark.parametrize(
    ("error", "status"), [(PermanentError, "failed"), (RuntimeError, "dead-lettered")]
)
def test_wait_exits_non_zero_when_an_event_does_not_succeed(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    cli_env: Context,
    error: type[Exception],
    status: str,
) -> None:
    # The worker's thread logs through the logging the command sets up: keep its
    # warnings about failed deliveries off the command's stderr.
    monkeypatch.setenv("FORGE_LOG_LEVEL", "ERROR")
    with running(worker_that(cli_env, fails_with=error)):
        code, out, err = run_cli(
            capsys, "publish", "--wait", "--timeout", "60", "new-data", json.dumps(new_data("e1"))
        )
    assert_one_line_error(code, err, "1 of 1 events did not succeed")
    (line,) = out.splitlines()
    assert line.split("  ")[1:3] == ["e1", status]
    assert "no good" in line


def test_wait_times_out_with_one_line_when_no_worker_reads(
    capsys: pytest.CaptureFixture[str], cli_env: Context
) -> None:
    code, out, err = run_cli(
        capsys, "publish", "--wait", "--timeout", "0.2", "new-data", json.dumps(new_data("e1"))
    )
    assert_one_line_error(code, err, "timed out after 0.2s waiting for the completion")
    assert out == ""
    assert cli_env.redis.xlen(cli_env.keys.new_data) == 1  # published all the same


def test_wait_ignores_completions_from_before_it_published(
    capsys: pytest.CaptureFixture[str], cli_env: Context
) -> None:
    event = json.dumps(new_data("e1"))
    with running(worker_that(cli_env)):
        assert run_cli(capsys, "publish", "new-data", event)[0] == 0
        wait_for(lambda: len(completions(cli_env)) == 1)
    # The same event id again, with no worker left: the old completion is not its.
    code, _, err = run_cli(capsys, "publish", "new-data", event, "--wait", "--timeout", "0.2")
    assert_one_line_error(code, err, "timed out")


def test_wait_refuses_at_once_when_no_worker_serves_the_embedded_redis(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("FORGE_HOME", str(tmp_path))
    code, _, err = run_cli(capsys, "publish", "new-data", json.dumps(new_data("e1")), "--wait")
    assert_one_line_error(code, err, "--wait needs a running 'forge worker'")
    assert not (tmp_path / "data").exists()  # nothing published, no server started


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "soon"])
def test_bad_timeout_is_a_usage_error(capsys: pytest.CaptureFixture[str], timeout: str) -> None:
    code, _, err = run_cli(capsys, "publish", "new-data", "{}", "--wait", "--timeout", timeout)
    assert code == 2
    assert_one_line_error(code, err, "--timeout")


def test_a_long_wait_outlasts_the_socket_timeout(ctx: Context) -> None:
    # redis-py gives up on a reply after socket_timeout (5 s by default): a wait longer
    # than that must not be one XREAD blocking all along.
    client = redis.Redis.from_url(TEST_REDIS_URL, socket_timeout=1.5)
    with pytest.raises(CompletionTimeout, match="after 2s"):
        wait_for_completions(
            StreamBroker(client, ctx.keys, maxlen=ctx.settings.stream_maxlen),
            {(ctx.keys.new_data, "1-1"): "e1"},
            since={ctx.keys.completions: "0-0"},
            timeout_s=2.0,
            on_completion=lambda completion: None,
        )
    client.close()
