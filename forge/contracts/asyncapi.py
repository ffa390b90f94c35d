"""An AsyncAPI 3.1 description of Forge's streams, generated from the msgspec event types.

The message payload schemas are the very ones ``schemas/*.schema.json`` are made from
(``forge.contracts.schemas.schema_components`` over ``forge.events``), so the two cannot disagree.
Operations are from Forge's point of view: it receives the input streams and sends
the output streams. Channel addresses use the default ``forge:`` prefix.
"""

from __future__ import annotations

from typing import Any

from forge import __version__
from forge.contracts.schemas import schema_components
from forge.events import (
    ALL_EVENTS,
    INPUT_STREAM_EVENTS,
    Completion,
    DeadLetter,
    Event,
    ModelVersion,
    Prediction,
    TrainingProgress,
    event_type_name,
)
from forge.keys import Keys

ASYNCAPI_VERSION = "3.1.0"
# Output streams (short names) and the event type each carries; inputs are in forge.events.
OUTPUT_STREAM_EVENTS: dict[str, tuple[type[Event], ...]] = {
    "completions": (Completion,),
    "model-versions": (ModelVersion,),
    "dead-letter": (DeadLetter,),
    "training-progress": (TrainingProgress,),
    "predictions": (Prediction,),
}

_DESCRIPTION = """\
Forge turns a Redis Streams event bus into an ML training and embedding engine.

Wire format: every stream entry has exactly one field, `event`, whose value is the
event as UTF-8 JSON (the message payload below). Unknown fields are ignored; missing or
invalid ones send the entry to the dead-letter stream. Forge reads the input streams
through the consumer group `forge`; anyone may read the output streams with XREAD or
their own consumer group. Stream names start with a configurable prefix
(`FORGE_STREAM_PREFIX`, default `forge:`).
"""

_CHANNEL_DESCRIPTIONS = {
    "new-data": "Records to embed and upsert into a collection; requests to re-embed "
    "one, and the batches of its backfill.",
    "training-requests": "Requests to train (or retrain) a model over a collection. This "
    "stream is the `normal` lane of the training queue; `training-requests:high` and "
    "`training-requests:low` are the other two, carrying the same messages. Workers take "
    "high before normal before low (a request waiting FORGE_PRIORITY_AGING_S competes a "
    "level higher); `forge publish` routes by the request's `priority`.",
    "completions": "One completion for every input event that reached a final state "
    "(succeeded, failed or dead-lettered).",
    "model-versions": "Each newly registered model version, and each promotion won online.",
    "dead-letter": "Input entries Forge gave up on; replay them with `forge dlq replay`.",
    "training-progress": "Live training curve points (one per epoch) for dashboards.",
    "predict-requests": "Inputs to label with a registered model; each request is answered "
    "by one prediction.",
    "feedback": "The true label of a row of an earlier prediction, joined to what every "
    "variant answered.",
    "predictions": "One prediction for every predict-request, from the version and variant "
    "it was routed to.",
    "trials": "The trials of hyperparameter searches (training requests with `tune`), put "
    "there by the worker running the study so that every trainer worker runs some.",
}


def _camel(name: str) -> str:
    head, *rest = name.split("-")
    return head + "".join(part.capitalize() for part in rest)


def stream_events(keys: Keys) -> dict[str, tuple[type[Event], ...]]:
    """Full stream name -> the event types it carries, inputs first."""
    by_short = {**INPUT_STREAM_EVENTS, **OUTPUT_STREAM_EVENTS}
    streams = (*keys.input_streams, *keys.output_streams)
    return {stream: by_short[keys.short(stream)] for stream in streams}


def _message(cls: type[Event]) -> dict[str, Any]:
    name = event_type_name(cls)
    return {
        "name": name,
        "title": cls.__name__,
        "summary": (cls.__doc__ or "").strip().splitlines()[0],
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{cls.__name__}"},
    }


def _channel(keys: Keys, stream: str, classes: tuple[type[Event], ...]) -> dict[str, Any]:
    short = keys.short(stream)
    return {
        "address": stream,
        "title": short,
        "description": _CHANNEL_DESCRIPTIONS[short],
        "messages": {
            _camel(event_type_name(cls)): {"$ref": f"#/components/messages/{cls.__name__}"}
            for cls in classes
        },
    }


def _operation(
    keys: Keys, stream: str, classes: tuple[type[Event], ...]
) -> tuple[str, dict[str, Any]]:
    short = keys.short(stream)
    channel = _camel(short)
    inbound = stream in keys.input_streams
    action = "receive" if inbound else "send"
    how = (
        f"Forge reads `{short}` with XREADGROUP in the consumer group `{keys.group}`."
        if inbound
        else f"Forge appends to `{short}` with XADD (trimmed with MAXLEN ~)."
    )
    operation = {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "summary": how,
        "messages": [
            {"$ref": f"#/channels/{channel}/messages/{_camel(event_type_name(cls))}"}
            for cls in classes
        ],
    }
    return f"{action}{channel[0].upper()}{channel[1:]}", operation


def document(keys: Keys | None = None) -> dict[str, Any]:
    """The AsyncAPI document as plain data (key order is kept when rendered)."""
    keys = keys or Keys()
    streams = stream_events(keys)
    _, schemas = schema_components(ALL_EVENTS, ref_template="#/components/schemas/{name}")
    operations = dict(_operation(keys, stream, cls) for stream, cls in streams.items())
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Forge",
            "version": __version__,
            "description": _DESCRIPTION,
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "redis": {
                "host": "localhost:6379",
                "protocol": "redis",
                "description": "Any Redis 7 server; Forge connects to `REDIS_URL`.",
            }
        },
        "channels": {_camel(keys.short(s)): _channel(keys, s, c) for s, c in streams.items()},
        "operations": operations,
        "components": {
            "messages": {cls.__name__: _message(cls) for cls in ALL_EVENTS},
            "schemas": schemas,
        },
    }


def render_yaml(doc: dict[str, Any] | None = None) -> str:
    """The document as YAML, in a stable layout (the drift test compares the text)."""
    import yaml  # type: ignore[import-untyped]  # PyYAML ships no stubs; only docs need it

    class Dumper(yaml.SafeDumper):  # type: ignore[misc]
        """Multi-line strings as ``|`` blocks, so descriptions read as written."""

    def text(dumper: Any, value: str) -> Any:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    body: str = yaml.dump(
        doc if doc is not None else document(),
        Dumper=Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=88,
        default_flow_style=False,
    )
    return "# Generated by `forge docs export` from forge/events/: do not edit.\n" + body
