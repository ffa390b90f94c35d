"""While a collection's new version is being built, new-data writes go to both: the
active version's rows as embedded by its model, and the same records embedded by the
building version's model (``forge.vectorstore.rebuild``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from forge.embedding.model import Embedder
from forge.embedding.service import EmbeddingService
from forge.vectorstore import MetadataUpdate, Row, Write


@dataclass(frozen=True, slots=True)
class BuildTarget:
    """The version being built and the loaded model that embeds for it."""

    version: int
    embedder: Embedder


class HasWrites(Protocol):
    @property
    def writes(self) -> list[Write]: ...

    @property
    def building_writes(self) -> list[Write]: ...


def add_building_writes(
    events: Sequence[HasWrites], target: BuildTarget, embedding: EmbeddingService
) -> None:
    """Give each event the building version's counterpart of its writes: its rows'
    texts embedded by the building model (in one call for all the events), its
    deletes and metadata updates as they are."""
    texts = [w.text for e in events for w in e.writes if isinstance(w, Row) and w.text is not None]
    vectors = iter(embedding.encode(target.embedder, texts).vectors if texts else ())
    model, model_version = target.embedder.name, target.embedder.version
    for event in events:
        for write in event.writes:
            counterpart: Write = write
            if isinstance(write, Row):
                # Ready vectors are refused while a version is being built, so every
                # row here has a text.
                counterpart = replace(
                    write, embedding=next(vectors), model=model, model_version=model_version
                )
            elif isinstance(write, MetadataUpdate):
                counterpart = replace(write, model_version=model_version)
            event.building_writes.append(counterpart)
