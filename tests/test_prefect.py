"""The orchestration hook: ``publish_and_wait`` (plain Python) and the Prefect task.

A fake worker thread stands in for Forge: it reads training requests and answers each
with a completion on the completions stream, as the real runtime does.
"""

from __future__ import annotations

import importlib
import json
import pickle
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from forge.errors import InvalidEvent
from forge.events import (
    EVENT_FIELD,
    Completion,
    ErrorInfo,
    Status,
    TrainingRequest,
    decode_as,
    encode,
    new_id,
)
from forge.integrations.prefect import (
    CompletionTimeout,
    TrainingFailed,
    last_entry_id,
    publish_and_wait,
    wait_for_completion,
)
from forge.keys import Keys
from forge.runtime.context import Context
from tests.support.redis_helpers import TEST_REDIS_URL

RESULT = {"model_version": 3, "metrics": {"accuracy": 0.91}, "run_id": "r-1"}
Respond = Callable[[TrainingRequest, str], list[Completion]]


def completion_for(
    keys: Keys, request: TrainingRequest, entry_id: str, status: Status = "succeeded"
) -> Completion:
    failed = status != "succeeded"
    return Completion(
        id=new_id(),
        source_id=request.id,
        source_stream=keys.training_requests,
        source_entry_id=entry_id,
        status=status,
        worker="fake-worker",
        result={} if failed else {**RESULT, "params": request.params},
        error=ErrorInfo(type="PermanentError", message="too few labelled rows") if failed else None,
    )


def answer(status: Status) -> Callable[[Keys], Respond]:
    """A responder that first publishes someone else's completion, then the real one."""

    def make(keys: Keys) -> Respond:
        def respond(request: TrainingRequest, entry_id: str) -> list[Completion]:
            other = TrainingRequest(id="someone-else", model="m", task="t", collection="c")
            return [
                completion_for(keys, other, "0-1"),
                completion_for(keys, request, entry_id, status),
            ]

        return respond

    return make


@contextmanager
def fake_worker(keys: Keys, respond: Respond) -> Iterator[list[TrainingRequest]]:
    """Answer every training request published while the block runs."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    seen: list[TrainingRequest] = []
    stop = threading.Event()

    def loop() -> None:
        after = "0-0"
        while not stop.is_set():
            reply: Any = client.xread({keys.training_requests: after}, count=10, block=50)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    after = entry_id.decode()
                    request = decode_as(TrainingRequest, fields[EVENT_FIELD])
                    seen.append(request)
                    for completion in respond(request, after):
                        client.xadd(keys.completions, {EVENT_FIELD: encode(completion)})

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=5)
        client.close()


# ---------------------------------------------------------------------- plain Python


def test_publish_and_wait_returns_the_completion(ctx: Context) -> None:
    with fake_worker(ctx.keys, answer("succeeded")(ctx.keys)) as seen:
        completion = publish_and_wait(
            "tickets-clf",
            "classifier",
            "tickets",
            {"label_field": "team"},
            training_timeout_s=120,
            timeout_s=10,
            settings=ctx.settings,
            promote="never",
        )
    assert completion.status == "succeeded"
    assert completion.result == {**RESULT, "params": {"label_field": "team"}}
    (request,) = seen
    assert completion.source_id == request.id
    assert (request.model, request.task, request.collection) == (
        "tickets-clf",
        "classifier",
        "tickets",
    )
    assert request.timeout_s == 120
    entries: Any = ctx.redis.xrange(ctx.keys.training_requests)
    assert json.loads(entries[0][1][EVENT_FIELD])["promote"] == "never"  # passed through
    assert request.created_at is not None  # stamped as `forge publish` does


@pytest.mark.parametrize("status", ["failed", "dead-lettered"])
def test_publish_and_wait_raises_with_the_error(ctx: Context, status: Status) -> None:
    with fake_worker(ctx.keys, answer(status)(ctx.keys)), pytest.raises(TrainingFailed) as caught:
        publish_and_wait(
            "m", "classifier", "c", event_id="req-1", timeout_s=10, settings=ctx.settings
        )
    assert caught.value.status == status
    assert caught.value.error is not None
    assert caught.value.error.type == "PermanentError"
    assert "'req-1'" in str(caught.value)
    assert "too few labelled rows" in str(caught.value)


def test_training_failed_survives_pickling() -> None:
    request = TrainingRequest(id="p-1", model="m", task="t", collection="c")
    error = TrainingFailed(completion_for(Keys(), request, "1-0", "dead-lettered"))
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.status, copy.completion, str(copy)) == (error.status, error.completion, str(error))


def test_publish_and_wait_times_out_leaving_the_request(ctx: Context) -> None:
    with pytest.raises(CompletionTimeout, match="no completion for training request 'slow-1'"):
        publish_and_wait(
            "m", "classifier", "c", event_id="slow-1", timeout_s=0.2, settings=ctx.settings
        )
    entries: Any = ctx.redis.xrange(ctx.keys.training_requests)
    (entry,) = entries
    assert decode_as(TrainingRequest, entry[1][EVENT_FIELD]).id == "slow-1"


def test_invalid_request_is_refused_before_publishing(ctx: Context) -> None:
    with pytest.raises(InvalidEvent, match="model"):
        publish_and_wait("bad name!", "classifier", "c", timeout_s=1, settings=ctx.settings)
    assert ctx.redis.xlen(ctx.keys.training_requests) == 0


def test_a_completion_published_before_the_wait_starts_is_seen(ctx: Context) -> None:
    """Reading from the id taken before publishing closes the race with a fast worker."""
    keys = ctx.keys
    ctx.redis.xadd(keys.completions, {EVENT_FIELD: b"not json"})  # older entries are skipped
    after = last_entry_id(ctx.redis, keys.completions)
    request = TrainingRequest(id="fast-1", model="m", task="t", collection="c")
    done = completion_for(keys, request, "1-0")
    ctx.redis.xadd(keys.completions, {EVENT_FIELD: b"not json either"})  # tolerated
    ctx.redis.xadd(keys.completions, {EVENT_FIELD: encode(done)})
    assert wait_for_completion(ctx.redis, keys, "fast-1", after, 1.0) == done


def test_completions_of_other_streams_do_not_match(ctx: Context) -> None:
    keys = ctx.keys
    request = TrainingRequest(id="same-id", model="m", task="t", collection="c")
    other = completion_for(keys, request, "1-0")
    other.source_stream = keys.new_data
    ctx.redis.xadd(keys.completions, {EVENT_FIELD: encode(other)})
    with pytest.raises(CompletionTimeout):
        wait_for_completion(ctx.redis, keys, "same-id", "0-0", 0.1)


def test_module_imports_without_touching_prefect() -> None:
    import forge.integrations.prefect as module

    assert "train_model" not in vars(module)  # built lazily, on first access
    with pytest.raises(AttributeError):
        module.no_such_thing  # noqa: B018


# ---------------------------------------------------------------------- Prefect


@pytest.fixture(scope="module")
def prefect_harness() -> Iterator[None]:
    pytest.importorskip("prefect")
    try:
        importlib.import_module("prefect.server.api.server")
    except TypeError as exc:  # e.g. FastAPI >= 0.155 with a Prefect that predates it
        pytest.skip(f"Prefect's local server cannot start here: {exc}")
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=60):
            yield


@pytest.fixture
def forge_env(monkeypatch: pytest.MonkeyPatch, ctx: Context) -> Context:
    monkeypatch.setenv("FORGE_STREAM_PREFIX", ctx.settings.stream_prefix)
    monkeypatch.setenv("FORGE_HOME", str(ctx.settings.home_dir))
    return ctx


@pytest.mark.slow
def test_prefect_task_returns_the_result(prefect_harness: None, forge_env: Context) -> None:
    from prefect import flow

    from forge.integrations.prefect import train_model

    @flow
    def nightly() -> dict[str, Any]:
        result: dict[str, Any] = train_model(
            "tickets-clf",
            "classifier",
            "tickets",
            {"label_field": "team"},
            redis_url=TEST_REDIS_URL,
            timeout_s=30,
        )
        return result

    with fake_worker(forge_env.keys, answer("succeeded")(forge_env.keys)) as seen:
        result = nightly()
    assert result == {**RESULT, "params": {"label_field": "team"}}
    assert len(seen) == 1


@pytest.mark.slow
def test_prefect_task_fails_the_flow(prefect_harness: None, forge_env: Context) -> None:
    from prefect import flow

    from forge.integrations.prefect import make_train_model_task

    train = make_train_model_task(retries=0, tags=["forge"])

    @flow
    def nightly() -> None:
        train("m", "classifier", "c", event_id="doomed-1", redis_url=TEST_REDIS_URL, timeout_s=30)

    with (
        fake_worker(forge_env.keys, answer("failed")(forge_env.keys)),
        pytest.raises(TrainingFailed) as caught,
    ):
        nightly()
    assert caught.value.completion.source_id == "doomed-1"
