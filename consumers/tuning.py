"""The trials of hyperparameter searches: putting them on the trials stream, and the
handler that runs them.

The train handler of a ``tune`` request puts one ``tune-trial`` entry per trial on
``forge:trials``; every trainer worker reads that stream, so they all work on the
study at once. An entry asks for "the study's next trial": a worker runs one if the
study still needs it (a stale trial's rerun first), else answers that there is none
to run. So a second copy of an entry is harmless, and an entry whose worker died is
reclaimed by Forge and runs the dead worker's trial again (the study queued it once
the trial's heartbeat stopped).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import structlog

from consumers.datasets import load_dataset
from consumers.once import Once
from forge.events import TrainingRequest, TuneTrial, encode, utcnow
from forge.runtime.context import Context
from forge.runtime.handlers import Message, Outcome, Succeeded
from forge.training.base import Dataset
from forge.training.service import TrainingService
from forge.training.tuning.search import FanOut, TuneService
from forge.training.tuning.study import Study
from forge.vectorstore import VectorStore

log = structlog.get_logger(__name__)
# Entry ids stay within an event id's 256 characters whatever the request's id.
_MAX_PLAIN_ID = 200


def trial_entry_id(request_id: str, slot: int) -> str:
    base = request_id
    if len(base) > _MAX_PLAIN_ID:
        base = hashlib.sha256(base.encode()).hexdigest()
    return f"{base}:trial-{slot}"


def fan_out_trials(ctx: Context, request: TrainingRequest) -> FanOut:
    """Puts a study's trials on the trials stream (an input stream: never trimmed)."""

    def fan_out(study: Study) -> None:
        for slot in range(study.target):
            event = TuneTrial(
                id=trial_entry_id(request.id, slot),
                created_at=utcnow(),
                study=study.name,
                request=request,
            )
            ctx.broker.publish_raw(ctx.keys.trials, encode(event))
        log.info("trials fanned out", study=study.name, trials=study.target)

    return fan_out


def open_tuner(
    ctx: Context, store: Once[VectorStore], training: Once[TrainingService]
) -> TuneService:
    """Studies in Forge's PostgreSQL (``forge.training.tuning.storage``)."""
    from forge.training.tuning.storage import open_storage

    storage = open_storage(store().url, ctx.settings)
    ctx.on_close(storage.remove_session)
    return TuneService(ctx.settings, training(), storage)


class TrialHandler:
    """Runs one trial per ``tune-trial`` entry (batches of one)."""

    def __init__(self, store: Once[VectorStore], tuner: Once[TuneService]) -> None:
        self.store = store
        self.tuner = tuner
        # The rows of the request whose trials this worker last ran: its next trial
        # of that study trains on the same snapshot without reading it again.
        self._data: tuple[str, Dataset, str | None] | None = None

    def __call__(self, messages: Sequence[Message[TuneTrial]]) -> list[Outcome]:
        return [self.handle(message) for message in messages]

    def handle(self, message: Message[TuneTrial]) -> Outcome:
        event = message.event
        ran = self.tuner().run_one(event, lambda: self._dataset(event.request), message.stream)
        if isinstance(ran, str):
            return Succeeded({"study": event.study, "skipped": ran})
        return Succeeded(ran.as_result(event.study))

    def _dataset(self, request: TrainingRequest) -> tuple[Dataset, str | None]:
        if self._data is not None and self._data[0] == request.id:
            return self._data[1], self._data[2]
        data, embedding_model = load_dataset(self.store(), request)
        self._data = (request.id, data, embedding_model)
        return data, embedding_model
