"""Run Forge trainings from Prefect flows (the optional ``forge[prefect]`` extra).

``publish_and_wait`` is plain Python: it publishes a ``training-request`` (validated by
the same code as ``forge publish``) and waits on the completions stream for the
completion of that request. ``train_model`` is that function as a Prefect task::

    from prefect import flow
    from forge.integrations.prefect import train_model

    @flow
    def nightly() -> None:
        result = train_model("tickets-clf", "classifier", "tickets", {"label_field": "team"})

Prefect is imported only when ``train_model`` (or ``make_train_model_task``) is first
used, so this module, and ``publish_and_wait``, work without it.

Why read from an id taken *before* publishing: a fast worker can complete the request
before a reader that starts at ``$`` (only entries newer than the read) is listening,
and that completion would never be seen.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import redis

from forge.cli.cmd_streams import validate_for_stream
from forge.errors import ForgeError, InvalidEvent
from forge.events import EVENT_FIELD, Completion, Decoder, ErrorInfo, new_id
from forge.keys import Keys
from forge.runtime.broker import StreamBroker
from forge.servers.endpoints import open_redis
from forge.settings import Settings

# Longest single XREAD block: a timeout is noticed at most this late.
_MAX_BLOCK_S = 5.0
# Added to the worst-case processing time of the default wait (queueing, reclaims).
_WAIT_MARGIN_S = 600.0
_completions = Decoder(Completion)


class TrainingFailed(ForgeError):
    """The training ended ``failed`` or ``dead-lettered``; ``error`` says why."""

    def __init__(self, completion: Completion) -> None:
        self.completion = completion
        self.status = completion.status
        self.error: ErrorInfo | None = completion.error
        reason = f"{self.error.type}: {self.error.message}" if self.error else "no error given"
        super().__init__(f"training {completion.source_id!r} {completion.status}: {reason}")

    def __reduce__(self) -> tuple[type[TrainingFailed], tuple[Completion]]:
        # Orchestrators pickle the exceptions of failed tasks; the default would call
        # the class with the message instead of the completion.
        return (type(self), (self.completion,))


class CompletionTimeout(ForgeError, TimeoutError):
    """No completion arrived in time. The request may still run: it stays in the stream."""


def publish_and_wait(
    model: str,
    task: str,
    collection: str,
    params: dict[str, Any] | None = None,
    *,
    event_id: str | None = None,
    training_timeout_s: float | None = None,
    timeout_s: float | None = None,
    redis_url: str | None = None,
    settings: Settings | None = None,
    **request_fields: Any,
) -> Completion:
    """Publish a training request and return its ``succeeded`` completion.

    ``request_fields`` are further training-request fields (``warm_start_from``,
    ``promote``, ``priority``, ...: see docs/events.md), validated like the rest; the
    request goes to the lane of its ``priority``.
    ``training_timeout_s`` goes into the request (the worker's limit on the training);
    ``timeout_s`` is how long to wait here, by default the longest the request can take
    to reach a final state: every allowed delivery running into its training timeout.
    Pass your own ``event_id`` to make republishing idempotent: Forge answers a
    completed id again with its first result instead of training again.

    Raises ``TrainingFailed`` on a ``failed`` or ``dead-lettered`` completion,
    ``CompletionTimeout`` when none arrives in time, ``InvalidEvent`` (before publishing
    anything) when the request does not validate.
    """
    settings = _settings(settings, redis_url)
    keys = Keys.from_settings(settings)
    request: dict[str, Any] = {
        **request_fields,
        "type": "training-request",
        "id": event_id or new_id(),
        "model": model,
        "task": task,
        "collection": collection,
        "params": params or {},
    }
    if training_timeout_s is not None:
        request["timeout_s"] = training_timeout_s
    (payload,) = validate_for_stream(keys, keys.training_requests, [request])
    wait_s = timeout_s if timeout_s is not None else _default_wait_s(settings, training_timeout_s)
    with open_redis(settings) as (client, _):
        broker = StreamBroker(client, keys, maxlen=settings.stream_maxlen)
        # Its completion comes on its partition's completions stream.
        part = keys.part_of(broker.route(keys.training_requests, payload))
        after = last_entry_id(client, part.completions)
        # To the lane of the request's priority.
        broker.publish_input(part.training_requests, payload)
        return wait_for_completion(client, part, request["id"], after, wait_s)


def _settings(settings: Settings | None, redis_url: str | None) -> Settings:
    base = settings if settings is not None else Settings.from_env()
    return base.replace(redis_url=redis_url) if redis_url else base


def _default_wait_s(settings: Settings, training_timeout_s: float | None) -> float:
    per_delivery = training_timeout_s or settings.training_timeout_s
    return per_delivery * settings.max_deliveries + _WAIT_MARGIN_S


def last_entry_id(client: redis.Redis, stream: str) -> str:
    """The id to read after so as to see only entries added from now on."""
    reply: Any = client.xrevrange(stream, "+", "-", count=1)
    if not reply:
        return "0-0"
    entry_id = reply[0][0]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def wait_for_completion(
    client: redis.Redis, keys: Keys, event_id: str, after: str, timeout_s: float
) -> Completion:
    """Read completions after entry id ``after`` until the one for ``event_id`` arrives
    (``keys``: the partition the request went to)."""
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        block_ms = max(int(min(remaining, _MAX_BLOCK_S) * 1000), 1)
        reply: Any = client.xread({keys.completions: after}, count=100, block=block_ms)
        for _, entries in reply or ():
            for entry_id, fields in entries:
                after = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                completion = _match(fields, keys, event_id)
                if completion is not None:
                    return _checked(completion)
    raise CompletionTimeout(f"no completion for training request {event_id!r} in {timeout_s:g}s")


def _match(fields: dict[bytes, bytes], keys: Keys, event_id: str) -> Completion | None:
    try:
        completion = _completions.decode(fields.get(EVENT_FIELD, b""))
    except InvalidEvent:
        return None  # not ours to judge: other writers may share the stream
    stream, _ = keys.lane_of(completion.source_stream)
    if completion.source_id != event_id or stream != keys.training_requests:
        return None
    return completion


def _checked(completion: Completion) -> Completion:
    if completion.status != "succeeded":
        raise TrainingFailed(completion)
    return completion


# ---------------------------------------------------------------------- Prefect


def _train_model(
    model: str,
    task: str,
    collection: str,
    params: dict[str, Any] | None = None,
    *,
    event_id: str | None = None,
    training_timeout_s: float | None = None,
    timeout_s: float | None = None,
    redis_url: str | None = None,
    **request_fields: Any,
) -> dict[str, Any]:
    """Train ``model`` on ``collection`` with Forge; returns the completion's result
    (metrics, model version). Raises ``TrainingFailed`` or ``CompletionTimeout``."""
    completion = publish_and_wait(
        model,
        task,
        collection,
        params,
        event_id=event_id,
        training_timeout_s=training_timeout_s,
        timeout_s=timeout_s,
        redis_url=redis_url,
        **request_fields,
    )
    return dict(completion.result)


def make_train_model_task(**task_options: Any) -> Any:
    """A Prefect task around ``publish_and_wait``; ``task_options`` go to ``prefect.task``
    (``retries``, ``timeout_seconds``, ``tags``...)."""
    from prefect import task

    options: dict[str, Any] = {"name": "forge-train-model", **task_options}
    return task(**options)(_train_model)


@functools.cache
def _default_task() -> Any:
    return make_train_model_task()


def __getattr__(name: str) -> Any:
    # ``train_model`` is built on first access so that importing this module, for
    # ``publish_and_wait`` alone, never needs Prefect.
    if name == "train_model":
        return _default_task()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
