"""Retraining on new data, wrapped around the new-data handler.

When a new-data event that names ``retrain`` succeeds, its outcome gains a training
request for that model (see ``forge.training.retrain``) in ``Succeeded.publish``: the
runtime publishes it to the training-requests stream in the transaction that acks
the new-data event, so it is published exactly once. An event the new-data handler
answers as already written (its worker died before the ack) plans the request again,
and that delivery is the one that publishes it. Training itself happens on the
training worker, not here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from consumers.once import Once
from forge.events import NewData
from forge.keys import Keys
from forge.runtime.handlers import Message, Outcome, Succeeded
from forge.training.retrain import plan_retrain
from forge.training.versions import ModelVersions

log = structlog.get_logger(__name__)

NewDataHandle = Callable[[Sequence[Message[NewData]]], Sequence[Outcome] | None]


class RetrainOnNewData:
    def __init__(self, inner: NewDataHandle, keys: Keys, versions: Once[ModelVersions]) -> None:
        self.inner = inner
        self.keys = keys
        # Connected on the first event that asks for retraining.
        self.versions = versions

    def __call__(self, messages: Sequence[Message[NewData]]) -> Sequence[Outcome] | None:
        outcomes = self.inner(messages)
        if not any(m.event.retrain for m in messages):
            return outcomes
        if outcomes is None:
            outcomes = [Succeeded() for _ in messages]
        return [self._with_retrain(m, o) for m, o in zip(messages, outcomes, strict=True)]

    def _with_retrain(self, message: Message[NewData], outcome: Outcome) -> Outcome:
        event = message.event
        if not event.retrain or not isinstance(outcome, Succeeded):
            return outcome
        planned = plan_retrain(self.versions(), event)
        if isinstance(planned, str):
            log.warning("no retraining", event_id=event.id, model=event.retrain, reason=planned)
            return Succeeded({**outcome.result, "retrain": {"skipped": planned}}, outcome.publish)
        publish = (*outcome.publish, (self.keys.training_requests, planned))
        return Succeeded({**outcome.result, "retrain": {"request_id": planned.id}}, publish)
