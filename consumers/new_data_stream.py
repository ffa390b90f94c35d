"""The new-data stream's handler: records to embed go to the new-data handler (with
retraining around it), re-embedding requests and their backfill batches to the
re-embed handler; the outcomes come back in the batch's order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from forge.events import NewData
from forge.runtime.handlers import Message, Outcome, Succeeded

Handle = Callable[[Sequence[Message[Any]]], Sequence[Outcome] | None]


class NewDataStream:
    def __init__(self, records: Handle, reembed: Handle) -> None:
        self.records = records
        self.reembed = reembed

    def __call__(self, messages: Sequence[Message[Any]]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        for handle, wanted in ((self.records, True), (self.reembed, False)):
            part = [i for i, m in enumerate(messages) if isinstance(m.event, NewData) is wanted]
            if not part:
                continue
            found = handle([messages[i] for i in part])
            results = list(found) if found is not None else [Succeeded() for _ in part]
            outcomes.update(zip(part, results, strict=True))
        return [outcomes[i] for i in range(len(messages))]
