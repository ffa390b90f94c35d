"""Records of new-data events turned into store writes: a row per changed record, a
metadata update for a record whose text and model did not change but whose metadata
did, nothing for an unchanged one, a delete per deleted record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from forge.events import NewData, Record
from forge.vectorstore import Delete, MetadataUpdate, Row, Write


@dataclass(slots=True)
class PendingEvent:
    """An event of a collection's batch on its way to the store: its writes, and what
    its result reports about them."""

    index: int
    event: NewData
    writes: list[Write] = field(default_factory=list)
    # The same writes for the collection's version being built, if one is.
    building_writes: list[Write] = field(default_factory=list)
    from_cache: int = 0
    embedded: int = 0
    unchanged: int = 0
    model: str | None = None
    model_version: str | None = None

    @property
    def result(self) -> dict[str, Any]:
        return {
            "collection": self.event.collection,
            "records": len(self.event.records),
            "upserted": sum(isinstance(w, Row) for w in self.writes),
            "deleted": sum(isinstance(w, Delete) for w in self.writes),
            "metadata_updated": sum(isinstance(w, MetadataUpdate) for w in self.writes),
            "unchanged": self.unchanged,
            "from_cache": self.from_cache,
            "embedded": self.embedded,
            "model": self.model,
            "model_version": self.model_version,
        }


class Kept(NamedTuple):
    """A record whose stored row stays: its text hash, the model version that made
    the row, and the metadata stored with it."""

    text_hash: str
    model_version: str
    metadata: dict[str, Any]


@dataclass(slots=True)
class Embedded:
    """What embedding a chunk's texts gave: the model, its version (``None`` when it
    embedded nothing), the records left unchanged, and the vectors of the others in
    order with whether each came from the cache."""

    model: str
    version: str | None
    kept: dict[str, Kept]
    vectors: list[np.ndarray[Any, Any]] = field(default_factory=list)
    cached: list[bool] = field(default_factory=list)


def add_writes(pending: list[PendingEvent], embedded: Embedded) -> None:
    """Give each event its writes: a delete, a metadata update of an unchanged record
    whose metadata changed, nothing for a wholly unchanged one, else a row."""
    position = 0
    for item in pending:
        for record in item.event.records:
            if record.deleted:
                item.writes.append(Delete(record.id, item.event.id))
                continue
            if embeds(record) and record.id in embedded.kept:
                kept = embedded.kept[record.id]
                if kept.metadata == record.metadata:
                    item.unchanged += 1
                else:
                    item.writes.append(
                        MetadataUpdate(
                            record.id,
                            item.event.id,
                            record.metadata,
                            kept.text_hash,
                            kept.model_version,
                        )
                    )
                continue
            # A row names the model that made its vector; a ready vector has none,
            # so a model trained on it is not offered texts (see training).
            made_by: str | None = None
            version: str | None = None
            if record.vector is not None:
                vector = np.asarray(record.vector, dtype=np.float32)
            else:
                vector, hit = embedded.vectors[position], embedded.cached[position]
                position += 1
                item.from_cache += hit
                item.embedded += not hit
                made_by, version = embedded.model, embedded.version
            item.writes.append(
                Row(
                    record.id,
                    vector,
                    item.event.id,
                    record.text,
                    record.metadata,
                    made_by,
                    version,
                )
            )


def embeds(record: Record) -> bool:
    """Whether ``record`` is a text for the model to embed."""
    return not record.deleted and record.vector is None and record.text is not None


def repeated_ids(pending: list[PendingEvent]) -> set[str]:
    """Record ids that more than one record of the batch writes."""
    seen: set[str] = set()
    repeated: set[str] = set()
    for item in pending:
        for record in item.event.records:
            (repeated if record.id in seen else seen).add(record.id)
    return repeated
