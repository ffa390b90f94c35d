"""The ``forge`` command line: publishing, status, dead-letter operations and errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from forge.cli.main import build_parser
from forge.contracts.schemas import drift
from forge.events import EVENT_FIELD, NewData
from forge.runtime.context import Context
from forge.runtime.deadletter import build_record, error_info
from forge.runtime.entries import Entry
from forge.runtime.handlers import Message
from forge.runtime.worker import Worker
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.events import new_data, publish
from tests.support.redis_helpers import running, wait_for
from tests.support.workers import completions, dead_letters, make_worker

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "required"),
        (["nonsense"], "invalid choice"),
        (["worker", "--processes", "0"], "positive"),
        (["worker", "--http-port", "99999"], "port"),
        (["dlq", "list", "--limit", "x"], "invalid int"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert_one_line_error(code, err, fragment)


def test_worker_help_describes_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "worker", "--help")
    assert code == 0
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for action in commands.choices["worker"]._actions:
        assert action.help, f"{action.option_strings} has no description"
    for option in ("--processes", "--http-port", "--http-host"):
        assert option in out


def test_unreachable_redis_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")
    code, _, err = run_cli(capsys, "status")
    assert_one_line_error(code, err, "cannot reach Redis")
    assert "hunter2" not in err


def test_bad_setting_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAX_BATCH_SIZE", "lots")
    code, _, err = run_cli(capsys, "status")
    assert_one_line_error(code, err, "MAX_BATCH_SIZE")


def test_cli_errors_never_print_tracebacks_in_a_real_process() -> None:
    env = {"REDIS_URL": "redis://127.0.0.1:1/0", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "forge.cli.main", "dlq", "list"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("forge: error: cannot reach Redis")
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------- publish


def test_publish_validates_then_publishes(
    capsys: pytest.CaptureFixture[str], cli_env: Context, tmp_path: Path
) -> None:
    code, out, _ = run_cli(capsys, "publish", "new-data", json.dumps(new_data("e1")))
    assert code == 0
    entries = cli_env.redis.xrange(cli_env.keys.new_data)
    assert [e[0].decode() for e in entries] == [out.strip()]
    event = json.loads(entries[0][1][EVENT_FIELD])
    assert event["id"] == "e1"
    assert "created_at" in event

    batch = tmp_path / "events.jsonl"
    batch.write_text("\n".join(json.dumps(new_data(f"f{i}")) for i in range(3)))
    code, out, _ = run_cli(capsys, "publish", "forge:new-data".replace("forge:", ""), f"@{batch}")
    assert code == 0
    assert len(out.split()) == 3


def test_publish_rejects_invalid_events_and_publishes_none(
    capsys: pytest.CaptureFixture[str], cli_env: Context
) -> None:
    events = [new_data("ok"), {"type": "new-data", "id": "bad", "collection": "c"}]
    code, _, err = run_cli(capsys, "publish", "new-data", json.dumps(events))
    assert_one_line_error(code, err, "event 1", "records")
    assert cli_env.redis.xlen(cli_env.keys.new_data) == 0


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["publish", "new-data", "{not json"], "malformed JSON"),
        (["publish", "nowhere", "{}"], "not an input stream"),
        (["publish", "new-data", "@/nonexistent/file.json"], "cannot read"),
        (["publish", "new-data", "[1, 2]"], "JSON object"),
        (["dlq", "replay"], "exactly one of"),
        (["dlq", "show", "1-1"], "no dead-letter record"),
        (["dlq", "list", "--filter", "colour=red"], "bad filter"),
    ],
)
def test_bad_input_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], cli_env: Context, argv: list[str], fragment: str
) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    assert_one_line_error(code, err, fragment)


# ---------------------------------------------------------------------- status


def test_status_reports_streams_and_dead_letters(
    capsys: pytest.CaptureFixture[str], cli_env: Context
) -> None:
    ctx = cli_env
    ctx.broker.ensure_groups(ctx.keys.input_streams)
    for i in range(3):
        publish(ctx.redis, ctx.keys.new_data, new_data(f"e{i}"))
    ctx.broker.read([ctx.keys.new_data], "c1", 1, None)
    code, out, _ = run_cli(capsys, "status", "--json")
    assert code == 0
    snap = json.loads(out)
    (stream,) = [s for s in snap["streams"] if s["stream"] == ctx.keys.new_data]
    assert stream["length"] == 3
    assert stream["groups"][0]["pending"] == 1
    assert stream["groups"][0]["lag"] == 2
    assert snap["dead_letter_depth"] == 0
    code, out, _ = run_cli(capsys, "status")
    assert code == 0
    assert ctx.keys.new_data in out
    assert "dead letters: 0" in out


# ---------------------------------------------------------------------- dead letters


def flaky_worker(ctx: Context, broken_flag: str) -> Worker:
    def handle(messages: Sequence[Message[NewData]]) -> None:
        if ctx.redis.exists(broken_flag):
            raise RuntimeError("downstream is broken")

    return make_worker(ctx, handle)


def test_dead_letter_replay_round_trip(
    capsys: pytest.CaptureFixture[str], cli_env: Context
) -> None:
    ctx = cli_env
    flag = f"{ctx.keys.prefix}broken"
    ctx.redis.set(flag, 1)
    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    publish(ctx.redis, ctx.keys.new_data, b"not json at all")
    with running(flaky_worker(ctx, flag)):
        wait_for(lambda: len(dead_letters(ctx)) == 2)

    code, out, _ = run_cli(capsys, "dlq", "list")
    assert code == 0
    assert "RuntimeError: downstream is broken" in out
    code, out, _ = run_cli(capsys, "dlq", "list", "--json", "--filter", "error_type=Runtime*")
    (listed,) = json.loads(out)
    assert listed["source_id"] == "e1"
    assert listed["deliveries"] == 3
    code, out, _ = run_cli(capsys, "dlq", "show", listed["entry_id"], "--json")
    assert json.loads(out)["error"]["traceback"].startswith("Traceback")
    code, out, _ = run_cli(capsys, "dlq", "show", listed["entry_id"])
    assert code == 0
    assert "\nTraceback (most recent call last):\n" in out

    ctx.redis.delete(flag)  # the operator fixed the cause
    code, out, _ = run_cli(capsys, "dlq", "replay", "--filter", "source_id=e1")
    assert code == 0
    assert "replayed 1" in out
    with running(flaky_worker(ctx, flag)):
        wait_for(lambda: any(c.status == "succeeded" for c in completions(ctx)))
    assert [r.source_id for r in dead_letters(ctx)] == [None]  # the poison one stays
    code, out, _ = run_cli(capsys, "status", "--json")
    assert json.loads(out)["dead_letter_replays"] == 1

    code, out, _ = run_cli(capsys, "dlq", "purge", "--all")
    assert "purged 1" in out
    assert dead_letters(ctx) == []


def test_replayed_event_that_fails_again_records_its_replays(
    capsys: pytest.CaptureFixture[str], cli_env: Context
) -> None:
    ctx = cli_env
    flag = f"{ctx.keys.prefix}broken"
    ctx.redis.set(flag, 1)
    publish(ctx.redis, ctx.keys.new_data, new_data("e1"))
    with running(flaky_worker(ctx, flag)):
        wait_for(lambda: len(dead_letters(ctx)) == 1)
        run_cli(capsys, "dlq", "replay", "--all")
        wait_for(lambda: len(dead_letters(ctx)) == 1 and dead_letters(ctx)[0].replays == 1)


def test_replay_publishes_exactly_the_bytes_received(
    capsys: pytest.CaptureFixture[str], cli_env: Context
) -> None:
    ctx = cli_env
    raw = b'\xff{"odd": "bytes"}'
    publish(ctx.redis, ctx.keys.new_data, raw)
    with running(flaky_worker(ctx, "unused")):
        wait_for(lambda: len(dead_letters(ctx)) == 1)
    assert dead_letters(ctx)[0].payload_encoding == "base64"
    ctx.redis.delete(ctx.keys.new_data)
    code, _, _ = run_cli(capsys, "dlq", "replay", "--all")
    assert code == 0
    ((_, fields),) = ctx.redis.xrange(ctx.keys.new_data)
    assert fields[EVENT_FIELD] == raw


def dead_letter_with(ctx: Context, payload: bytes, exc: Exception) -> str:
    """A record as a worker writes it, for ``exc`` raised here (so with a traceback)."""
    try:
        raise exc
    except Exception as raised:
        error = error_info(raised)
    entry = Entry(ctx.keys.new_data, "1700000000000-0", {EVENT_FIELD: payload}, deliveries=3)
    record = build_record(entry, error, group=ctx.keys.group, consumer="worker-1")
    return ctx.broker.publish(ctx.keys.dead_letter, record)


def test_dlq_show_prints_a_record_for_people(
    capsys: pytest.CaptureFixture[str], cli_env: Context
) -> None:
    payload = b'{"type":"new-data","id":"e1","collection":"tickets","records":[]}'
    entry_id = dead_letter_with(cli_env, payload, RuntimeError("model exploded"))
    code, out, _ = run_cli(capsys, "dlq", "show", entry_id)
    assert code == 0
    lines = out.splitlines()
    for field in (
        f"entry_id: {entry_id}",
        f"source_stream: {cli_env.keys.new_data}",
        "source_entry_id: 1700000000000-0",
        "source_id: e1",
        "deliveries: 3",
        "consumer: worker-1",
        "error_type: RuntimeError",
        "error_message: model exploded",
    ):
        assert field in lines, field
    payload_at = lines.index("payload:")
    assert lines[payload_at + 1 : payload_at + 3] == ["{", '  "type": "new-data",']
    traceback = lines[lines.index("traceback:") + 1 :]
    assert traceback[0] == "Traceback (most recent call last):"
    assert traceback[-1] == "RuntimeError: model exploded"
    code, out, _ = run_cli(capsys, "dlq", "show", entry_id, "--json")
    assert out.count("\n") == 1
    assert json.loads(out)["error"]["message"] == "model exploded"


def test_dlq_show_escapes_what_would_drive_the_terminal(
    capsys: pytest.CaptureFixture[str], cli_env: Context
) -> None:
    entry_id = dead_letter_with(
        cli_env, "\x1b[2Jnot json\u202e".encode(), ValueError("a\nb\x1b[31m")
    )
    code, out, _ = run_cli(capsys, "dlq", "show", entry_id)
    assert code == 0
    assert "\x1b" not in out
    assert "\u202e" not in out
    assert "\\x1b[2Jnot json\\u202e" in out.splitlines()  # shown as it came, escaped
    assert "error_message: a\\nb\\x1b[31m" in out.splitlines()  # one line


@pytest.mark.parametrize(
    "argv",
    [
        ["dlq", "show", "nope"],
        ["dlq", "show", "-"],
        ["dlq", "show", "1700000000000"],
        ["dlq", "show", "1-18446744073709551616"],
        ["dlq", "replay", "1-1", "nope"],
        ["dlq", "purge", "nope"],
    ],
)
def test_malformed_entry_ids_are_usage_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    # Unreachable: the id is refused before Forge connects, so no Redis error can show.
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    bad = next(a for a in argv[2:] if a != "1-1")
    assert_one_line_error(code, err, f"{bad!r} is not a stream entry ID", "1700000000000-0")
    assert "Redis" not in err


# ---------------------------------------------------------------------- schemas


def test_schema_files_match_the_code() -> None:
    assert drift(REPO / "schemas") == [], "run 'forge schemas export' and commit the result"


def test_schemas_export_and_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "schemas", "export", "--dir", str(tmp_path), "--check")
    assert_one_line_error(code, err, "out of date")
    code, out, _ = run_cli(capsys, "schemas", "export", "--dir", str(tmp_path))
    assert code == 0
    assert "new-data.schema.json" in out
    schema = json.loads((tmp_path / "new-data.schema.json").read_text())
    assert schema["$schema"].endswith("2020-12/schema")
    code, _, _ = run_cli(capsys, "schemas", "export", "--dir", str(tmp_path), "--check")
    assert code == 0


_FLOOD = """
import argparse, sys
from forge.cli import main

def flood(args, settings):
    for _ in range(100_000):
        sys.stdout.write("x" * 99 + "\\n")
    return 0

main.exit_now(main._run_reporting_errors(argparse.Namespace(command="dlq", run=flood)))
"""


def test_a_reader_that_goes_away_is_no_error() -> None:
    """`forge dlq list | head -1`: the command stops quietly, as a shell's SIGPIPE would."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _FLOOD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.read(100)
    proc.stdout.close()  # the reader goes away; the child is still writing
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert err == ""
