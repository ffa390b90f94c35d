"""Event contracts: the msgspec types every stream entry carries.

Wire format: each stream entry has exactly one field, ``event``, whose value is the
event as UTF-8 JSON. Unknown fields are ignored (forward compatible); missing or
invalid fields are validation errors. ``forge schemas export`` turns these types into
the JSON Schema files under ``schemas/``.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec
from msgspec import Meta

from forge.errors import InvalidEvent
from forge.keys import Priority

SCHEMA_VERSION = 1
EVENT_FIELD = b"event"

# Producer-chosen ids: printable, no whitespace or control characters. ``(?!\n)$``
# because ``$`` alone also matches before a trailing newline.
EventId = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x20\x7f]+(?!\n)$")]
# Collection and model names become SQL identifiers and folder names: keep them plain.
Name = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*(?!\n)$",
        description="letters, digits, '_' and '-', starting with a letter or '_'",
    ),
]
# An embedding model an event may ask for: a hub-style id ("all-MiniLM-L6-v2",
# "org/name"), never a filesystem path: events are untrusted, and loading whatever
# path they name would let any producer make a worker read its disk. Operators who
# want a local path configure it with FORGE_EMBEDDING_MODEL instead.
ModelName = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=96,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?(?!\n)$",
        description="a model id such as 'all-MiniLM-L6-v2' or 'org/name'; no paths",
    ),
]
# What msgspec's datetime decoder accepts (RFC 3339, a naive time included), so that a
# validator in any language rejects what Forge would dead-letter: many validators treat
# ``format`` as an annotation only.
Timestamp = Annotated[
    datetime,
    Meta(
        extra_json_schema={
            "format": "date-time",
            "pattern": r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[Tt ]([01]\d|2[0-3])"
            r":[0-5]\d:[0-5]\d(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):?[0-5]\d)?(?!\n)$",
        }
    ),
]
Status = Literal["succeeded", "failed", "dead-lettered"]
# What a training request may ask to export its version to.
ExportFormat = Literal["onnx"]


def utcnow() -> datetime:
    return datetime.now(UTC)


# A random (version 4, RFC 4122 variant) UUID as 32 hex digits, like ``uuid4().hex``
# at half the cost: one is made per completion, so it is on the hot path.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_id() -> str:
    return f"{int.from_bytes(os.urandom(16)) & _UUID4_CLEAR | _UUID4_SET:032x}"


class Event(msgspec.Struct, kw_only=True, tag_field="type", omit_defaults=False):
    """Fields every event has. ``created_at`` defaults to the time Redis received it."""

    id: EventId
    created_at: Timestamp | None = None
    version: int = SCHEMA_VERSION


# ---------------------------------------------------------------------------- inputs


class Record(msgspec.Struct, kw_only=True):
    """One item of a new-data event: a text to embed, or a ready vector."""

    id: EventId
    text: str | None = None
    vector: list[float] | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    deleted: bool = False

    def __post_init__(self) -> None:
        if not self.deleted and self.text is None and self.vector is None:
            raise ValueError(f"record {self.id!r} has neither `text` nor `vector`")


# ``__post_init__``'s rule in the schema: a record that is not deleted has a text or a
# vector. It sits on the reference, as msgspec gives a Struct no schema of its own.
RecordItem = Annotated[
    Record,
    Meta(
        extra_json_schema={
            "anyOf": [
                {"required": ["text"], "properties": {"text": {"type": "string"}}},
                {"required": ["vector"], "properties": {"vector": {"type": "array"}}},
                {"required": ["deleted"], "properties": {"deleted": {"const": True}}},
            ]
        }
    ),
]


class NewData(Event, tag="new-data"):
    """Records to embed and upsert into a collection."""

    collection: Name
    records: Annotated[list[RecordItem], Meta(min_length=1)]
    model: ModelName | None = None
    retrain: Name | None = None


class Tune(msgspec.Struct, kw_only=True):
    """A hyperparameter search: ``trials`` trainings with parameters drawn from
    ``space`` (Optuna's TPE sampler), the best of which becomes the version.

    ``space`` maps a parameter of the task to ``{"low", "high", "log"}`` (a number range;
    integers when both bounds are) or ``{"choices": [...]}``; it is checked against the
    task's parameters by the train handler, so an unknown parameter or a bad range is
    a ``failed`` completion with the reason. Leave it out for the task's default space.
    ``metric`` and ``direction`` default to the task's primary metric, maximized.
    ``timeout_s`` bounds the study: no trial starts after it, running ones finish."""

    trials: Annotated[int, Meta(ge=1, le=10_000)] = 20
    timeout_s: Annotated[float, Meta(gt=0)] | None = None
    metric: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    direction: Literal["maximize", "minimize"] | None = None
    space: dict[str, dict[str, Any]] | None = None


class Reembed(Event, tag="reembed"):
    """Re-embed a collection with a model (by default the one it uses) into a new
    version, in the background, while the active version keeps serving."""

    collection: Name
    model: ModelName | None = None
    # Records per backfill batch (one new-data stream entry each); default MAX_BATCH_SIZE.
    batch_records: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    # The new version's column type (default FORGE_VECTOR_STORAGE): "halfvec" halves it.
    storage: Literal["vector", "halfvec"] | None = None


class ReembedBatch(Event, tag="reembed-batch"):
    """One batch of a re-embedding's backfill: the collection's records with ids from
    ``start`` (inclusive, none: the first) to ``stop`` (exclusive, none: the last).
    Forge publishes these on ``new-data``; any worker reading it embeds them."""

    collection: Name
    collection_version: Annotated[int, Meta(ge=2)]
    batch: Annotated[int, Meta(ge=0)]
    batches: Annotated[int, Meta(ge=1)]
    start: str | None = None
    stop: str | None = None


class Resources(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a training runs on: ``processes`` CPU ranks (gloo) or ``gpus`` GPU ranks
    (NCCL) of one DistributedDataParallel training, launched by torch's elastic launch.
    At most one of the two; 1 (or neither) trains in the worker's own process. The
    worker checks the count against its CPU cores or visible GPUs: more is a
    ``failed`` completion with the reason."""

    processes: Annotated[int, Meta(ge=1, le=1024)] | None = None
    gpus: Annotated[int, Meta(ge=1, le=1024)] | None = None

    def __post_init__(self) -> None:
        if self.processes is not None and self.gpus is not None:
            raise ValueError("give `processes` or `gpus`, not both")


class TrainingRequest(Event, tag="training-request"):
    """Train (or retrain) a model over a collection."""

    model: Name
    task: Annotated[str, Meta(min_length=1, max_length=64)]
    collection: Name
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    timeout_s: Annotated[float, Meta(gt=0)] | None = None
    # An alias ("champion", "candidate"), a version number or "latest" of this model
    # to continue from (warm start, transfer, partial_fit); none: train from scratch.
    warm_start_from: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    # Train on these records of the collection only (incremental retraining).
    record_ids: Annotated[list[EventId], Meta(min_length=1)] | None = None
    # When the new version becomes the champion: if it beats the current one on the
    # model's primary metric, always, or never (left as the candidate); or, with
    # "on-significance", when it wins an online comparison against the champion on
    # live feedback (``forge models compare``).
    promote: Literal["if-better", "always", "never", "on-significance"] = "if-better"
    # Which lane of the training queue the request waits in: workers take high before
    # normal before low, and a request rises a level for each FORGE_PRIORITY_AGING_S it
    # waits. `forge publish` and the Python API route by it to the
    # `training-requests:high` / `:low` streams; `training-requests` is the normal lane.
    priority: Priority = "normal"
    # Search the hyperparameters instead of training ``params`` once: the best trial
    # is registered (``params`` fixes what the search leaves alone).
    tune: Tune | None = None
    # Optimized exports of the registered version: "onnx" adds an ONNX export of the
    # classifier and a dynamically int8-quantized one, each with its accuracy delta
    # against the torch model on the validation split; serving runs one when within
    # FORGE_ONNX_MAX_ACCURACY_DELTA.
    export: Annotated[list[ExportFormat], Meta(max_length=8)] = msgspec.field(default_factory=list)
    # Train data-parallel over several processes or GPUs (the classifier task only).
    resources: Resources | None = None


class TuneTrial(Event, tag="tune-trial"):
    """One trial of a hyperparameter search, for any trainer worker to run.

    The train handler of a ``tune`` request puts ``tune.trials`` of these on the trials
    stream; a worker that takes one runs the study's next trial if it still needs one
    (a trial of a worker that died, else a new one), so duplicates are harmless."""

    study: Annotated[str, Meta(min_length=1, max_length=512)]
    request: TrainingRequest


class PredictInput(msgspec.Struct, kw_only=True):
    """One row to label: a ready vector, or a text the model's embedding model embeds
    (models trained on an embedded collection only)."""

    vector: list[float] | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if (self.vector is None) == (self.text is None):
            raise ValueError("each input has exactly one of `vector` or `text`")


# ``__post_init__``'s rule in the schema, as for ``RecordItem``. A field "has" a value
# when it is present and not null: ``{"vector": [1], "text": null}`` is a vector input.
_HAS_VECTOR = {"required": ["vector"], "properties": {"vector": {"type": "array"}}}
_HAS_TEXT = {"required": ["text"], "properties": {"text": {"type": "string"}}}
PredictInputItem = Annotated[
    PredictInput,
    Meta(
        extra_json_schema={
            "oneOf": [{**_HAS_VECTOR, "not": _HAS_TEXT}, {**_HAS_TEXT, "not": _HAS_VECTOR}]
        }
    ),
]
# A version to pin: an alias ("champion", "candidate"), or a number (as a number or
# a string). Pinning bypasses the model's traffic split.
VersionRef = Annotated[int, Meta(ge=1)] | Annotated[str, Meta(min_length=1, max_length=64)]


class PredictRequest(Event, tag="predict-request"):
    """Label ``inputs`` with ``model``; answered by one ``prediction`` event."""

    model: Name
    inputs: Annotated[list[PredictInputItem], Meta(min_length=1, max_length=10_000)]
    # Routing key: one key always gets the same variant while a split stands.
    key: Annotated[str, Meta(max_length=256)] | None = None
    # ``version`` is every event's schema version, hence the longer name (as in
    # ``model-version`` events).
    model_version: VersionRef | None = None


class Feedback(Event, tag="feedback"):
    """The true label of one row of an earlier prediction."""

    prediction_id: EventId
    label: Annotated[str, Meta(min_length=1, max_length=256)]
    index: Annotated[int, Meta(ge=0)] = 0


# --------------------------------------------------------------------------- outputs


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


INPUT_EVENTS: tuple[type[Event], ...] = (
    NewData,
    Reembed,
    ReembedBatch,
    TrainingRequest,
    PredictRequest,
    Feedback,
    TuneTrial,
)
OUTPUT_EVENTS: tuple[type[Event], ...] = (
    Completion,
    ModelVersion,
    TrainingProgress,
    Prediction,
    DeadLetter,
)
ALL_EVENTS: tuple[type[Event], ...] = INPUT_EVENTS + OUTPUT_EVENTS
# Input streams (short names, see forge.keys) and the event types each one carries,
# the main one first (it names the stream's decoding errors).
INPUT_STREAM_EVENTS: dict[str, tuple[type[Event], ...]] = {
    "new-data": (NewData, Reembed, ReembedBatch),
    "training-requests": (TrainingRequest,),
    "predict-requests": (PredictRequest,),
    "feedback": (Feedback,),
    "trials": (TuneTrial,),
}

_encoder = msgspec.json.Encoder()


def event_type_name(cls: type[Event]) -> str:
    tag = cls.__struct_config__.tag
    return str(tag)


def encode(event: Event) -> bytes:
    """Serialise an event to the JSON stored in an entry's ``event`` field."""
    return _encoder.encode(event)


E = TypeVar("E", bound="Event")


class Decoder(Generic[E]):
    """Decodes the ``event`` field of stream entries into one event type, or into one
    of ``event_type`` and ``also`` by the ``type`` tag (errors name ``event_type``)."""

    def __init__(self, event_type: type[E], also: tuple[type[Event], ...] = ()) -> None:
        self.event_type = event_type
        target: Any = event_type
        for other in also:
            target = target | other
        self._decoder: msgspec.json.Decoder[E] = msgspec.json.Decoder(target)

    def decode(self, payload: bytes) -> E:
        try:
            return self._decoder.decode(payload)
        except msgspec.ValidationError as exc:
            raise InvalidEvent(f"invalid {event_type_name(self.event_type)} event: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise InvalidEvent(f"malformed JSON: {exc}") from exc
        # msgspec raises these outside its own hierarchy; a producer's bytes must end
        # in a dead letter, never in an exception that stops the worker.
        except RecursionError:
            raise InvalidEvent("malformed JSON: nested too deeply") from None
        except UnicodeDecodeError as exc:
            reason = f"malformed JSON: invalid UTF-8 in a string ({exc.reason})"
            raise InvalidEvent(reason) from None


def decode_as(event_type: type[E], payload: bytes | str) -> E:
    """Decode one payload; convenient for the CLI and tests (hot paths keep a Decoder)."""
    data = payload.encode() if isinstance(payload, str) else payload
    return Decoder(event_type).decode(data)


def event_type_for(name: str) -> type[Event]:
    for cls in ALL_EVENTS:
        if event_type_name(cls) == name:
            return cls
    raise InvalidEvent(f"unknown event type {name!r}")
