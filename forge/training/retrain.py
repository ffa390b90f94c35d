"""Incremental retraining: a new-data event naming ``retrain: MODEL`` asks for a new
version of that model trained on the event's records only, continuing from the
model's latest version (warm start, ``partial_fit``) with its task and parameters.

The request's id derives from the new-data event's, so however often the event is
redelivered there is one request, and the training handler makes one version of it.
"""

from __future__ import annotations

import hashlib

from forge.events import NewData, TrainingRequest, utcnow
from forge.training.versions import LATEST, ModelVersions

_MAX_ID_CHARS = 256


def retrain_request_id(event_id: str, model: str) -> str:
    plain = f"retrain:{event_id}:{model}"
    if len(plain) <= _MAX_ID_CHARS:
        return plain
    # Too long for an event id: a digest keeps it deterministic and unique.
    return f"retrain:{hashlib.sha256(event_id.encode()).hexdigest()}:{model}"


def plan_retrain(versions: ModelVersions, event: NewData) -> TrainingRequest | str:
    """The training request for ``event.retrain``, or why there is none."""
    model = event.retrain
    if model is None:
        return "the event names no model to retrain"
    record_ids = [r.id for r in event.records if not r.deleted]
    if not record_ids:
        return "the event adds no records"
    latest = versions.latest(model)
    if latest is None:
        return f"model {model!r} has no version to continue from: train it first"
    return TrainingRequest(
        id=retrain_request_id(event.id, model),
        created_at=utcnow(),
        model=model,
        task=latest.task,
        collection=event.collection,
        params=latest.params,
        warm_start_from=LATEST,
        record_ids=record_ids,
    )
