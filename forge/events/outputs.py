"""Output events: what Forge publishes about what it did."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from forge.events.base import Event, Status


class ErrorInfo(msgspec.Struct, kw_only=True):
    type: str
    message: str
    traceback: str = ""


class Timings(msgspec.Struct, kw_only=True):
    """Seconds. ``queue_s`` is from the entry's arrival in Redis to the handler start."""

    queue_s: float = 0.0
    handler_s: float = 0.0
    total_s: float = 0.0


class Completion(Event, tag="completion"):
    """Published once for every input event that reached a final state."""

    source_id: str | None  # None when the entry had no readable event id
    source_stream: str
    source_entry_id: str
    status: Status
    worker: str
    deliveries: int = 1
    duplicate: bool = False
    timings: Timings = msgspec.field(default_factory=Timings)
    result: dict[str, Any] = msgspec.field(default_factory=dict)
    error: ErrorInfo | None = None


class ModelVersion(Event, tag="model-version"):
    """A newly registered model version, or one promoted later (``reason`` says why)."""

    model: str
    model_version: int
    run_id: str
    source_id: str
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    aliases: list[str] = msgspec.field(default_factory=list)
    artifact_uri: str = ""
    # Empty for a registration; "won online comparison" when ``promote: on-significance``
    # made the version champion, with ``evidence``: the test, its bound, z, and each
    # side's feedback, correct answers and accuracy.
    reason: str = ""
    evidence: dict[str, Any] = msgspec.field(default_factory=dict)


class TrainingProgress(Event, tag="training-progress"):
    """Live training curve points for dashboards."""

    model: str
    source_id: str
    epoch: int
    epochs: int
    loss: float
    metric: float | None = None
    eta_s: float | None = None
    # The trial of a hyperparameter search (``tune``) this curve belongs to.
    trial: int | None = None


class Label(msgspec.Struct, kw_only=True):
    label: str
    score: float


class Prediction(Event, tag="prediction"):
    """The answer to a ``predict-request`` (``source_id``): one label per input, from
    the version and variant the request was routed to."""

    source_id: str
    model: str
    model_version: int
    variant: str
    predictions: list[Label]


class DeadLetter(Event, tag="dead-letter"):
    """An input entry that will not be processed again unless replayed.

    ``payload`` is the entry's ``event`` field exactly as received; when it was not
    valid UTF-8 it is base64 and ``payload_encoding`` says so.
    """

    source_stream: str
    source_entry_id: str
    payload: str
    error: ErrorInfo
    deliveries: int
    group: str = ""
    consumer: str = ""
    source_id: str | None = None
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"
    replays: int = 0
