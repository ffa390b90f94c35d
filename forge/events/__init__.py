"""Event contracts: the msgspec types every stream entry carries.

Wire format: each stream entry has exactly one field, ``event``, whose value is the
event as UTF-8 JSON. Unknown fields are ignored (forward compatible); missing or
invalid fields are validation errors. ``forge schemas export`` turns these types into
the JSON Schema files under ``schemas/``.

The types live in ``base`` (what every event shares), ``inputs`` (what producers
publish), ``outputs`` (what Forge publishes) and ``codec`` (which stream carries
which, and the wire encoding); this package is the one place callers import them from.
"""

from forge.events.base import (
    EVENT_FIELD,
    SCHEMA_VERSION,
    Event,
    EventId,
    ExportFormat,
    ModelName,
    Name,
    Status,
    Timestamp,
    new_id,
    utcnow,
)
from forge.events.codec import (
    ALL_EVENTS,
    INPUT_EVENTS,
    INPUT_STREAM_EVENTS,
    OUTPUT_EVENTS,
    Decoder,
    decode_as,
    encode,
    event_type_for,
    event_type_name,
)
from forge.events.inputs import (
    Feedback,
    NewData,
    PredictInput,
    PredictInputItem,
    PredictRequest,
    Record,
    RecordItem,
    Reembed,
    ReembedBatch,
    Resources,
    TrainingRequest,
    Tune,
    TuneTrial,
    VersionRef,
)
from forge.events.outputs import (
    Completion,
    DeadLetter,
    ErrorInfo,
    Label,
    ModelVersion,
    Prediction,
    Timings,
    TrainingProgress,
)

__all__ = [
    "ALL_EVENTS",
    "EVENT_FIELD",
    "INPUT_EVENTS",
    "INPUT_STREAM_EVENTS",
    "OUTPUT_EVENTS",
    "SCHEMA_VERSION",
    "Completion",
    "DeadLetter",
    "Decoder",
    "ErrorInfo",
    "Event",
    "EventId",
    "ExportFormat",
    "Feedback",
    "Label",
    "ModelName",
    "ModelVersion",
    "Name",
    "NewData",
    "PredictInput",
    "PredictInputItem",
    "PredictRequest",
    "Prediction",
    "Record",
    "RecordItem",
    "Reembed",
    "ReembedBatch",
    "Resources",
    "Status",
    "Timestamp",
    "Timings",
    "TrainingProgress",
    "TrainingRequest",
    "Tune",
    "TuneTrial",
    "VersionRef",
    "decode_as",
    "encode",
    "event_type_for",
    "event_type_name",
    "new_id",
    "utcnow",
]
