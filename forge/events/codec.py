"""Which events each stream carries, and their encoding on the wire."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from forge.errors import InvalidEvent
from forge.events.base import Event
from forge.events.inputs import (
    Feedback,
    NewData,
    PredictRequest,
    Reembed,
    ReembedBatch,
    TrainingRequest,
    TuneTrial,
)
from forge.events.outputs import (
    Completion,
    DeadLetter,
    ModelVersion,
    Prediction,
    TrainingProgress,
)

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
