"""Input events: what producers publish for Forge to act on."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from forge.events.base import (
    Event,
    EventId,
    ExportFormat,
    ModelName,
    Name,
)
from forge.keys import Priority


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
