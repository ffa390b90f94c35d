"""Values passed to and returned by the vector store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from forge.errors import InvalidEvent, PermanentError
from forge.settings import Settings, check_hnsw, check_storage

Vector = npt.NDArray[np.float32]
JsonObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Row:
    """Insert or replace record ``id`` on behalf of input event ``event_id``.

    ``model`` and ``model_version`` name the embedding model (and the hash of its
    weights) that made the vector from ``text``; the store records them with a hash of
    the text, so that an unchanged record can be recognised later (``Fingerprint``).
    """

    id: str
    embedding: Vector
    event_id: str
    text: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    model_version: str | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove record ``id`` (if present) on behalf of input event ``event_id``."""

    id: str
    event_id: str


@dataclass(frozen=True, slots=True)
class MetadataUpdate:
    """Replace record ``id``'s metadata, leaving its text and vector alone, on behalf of
    input event ``event_id``; only while the row is still made from a text with hash
    ``text_hash`` by model version ``model_version`` (else a racing write replaced it)."""

    id: str
    event_id: str
    metadata: Mapping[str, Any]
    text_hash: str
    model_version: str


Write = Row | Delete | MetadataUpdate


@dataclass(frozen=True, slots=True)
class VersionWrites:
    """A batch's writes for collection version ``version``, made with its model."""

    version: int
    writes: Sequence[Write]


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a stored row was made from: a hash of its text (``None`` without one), the
    model and its version (``None`` for a ready vector or a row written before they
    were recorded), and its metadata."""

    text_hash: str | None
    model: str | None
    model_version: str | None
    metadata: JsonObject

    def matches(self, text_hash: str, model: str, model_version: str) -> bool:
        """Whether embedding a text with ``text_hash`` by that model would remake it."""
        return (
            self.text_hash == text_hash
            and self.model == model
            and self.model_version == model_version
        )


@dataclass(frozen=True, slots=True)
class Collection:
    """A collection's catalog entry (``forge_collections``)."""

    name: str
    table: str
    dimension: int
    model: str | None
    # The active version, whose table ``table`` is (see ``CollectionVersion``).
    version: int = 1
    storage: str = "vector"


VersionState = Literal["active", "building", "retired"]


@dataclass(frozen=True, slots=True)
class CollectionVersion:
    """One version of a collection: its own table of rows embedded by ``model``.

    A collection has one ``active`` version (the one searches and training read), at
    most one ``building`` (being re-embedded, written beside the active one), and any
    number of ``retired`` ones (earlier versions kept for a rollback).
    """

    collection: str
    version: int
    table: str
    model: str | None
    dimension: int
    hnsw_m: int
    hnsw_ef_construction: int
    state: VersionState
    created_at: datetime
    activated_at: datetime | None
    batches_total: int = 0
    batches_done: int = 0
    storage: str = "vector"


@dataclass(frozen=True, slots=True)
class IndexOptions:
    """HNSW parameters; the defaults are pgvector's.

    ``m`` and ``ef_construction`` shape the index of a collection when it is created:
    existing collections keep the index they were built with. ``ef_search`` is the
    candidate list of every search (raised to k for larger k). ``ConfigError`` for
    values pgvector would refuse.
    """

    m: int = 16
    ef_construction: int = 64
    ef_search: int = 40
    # The column type of the collections created: "vector" or "halfvec".
    storage: str = "vector"

    def __post_init__(self) -> None:
        check_hnsw(self.m, self.ef_construction, self.ef_search)
        check_storage(self.storage)

    @classmethod
    def from_settings(cls, settings: Settings) -> IndexOptions:
        return cls(
            settings.hnsw_m,
            settings.hnsw_ef_construction,
            settings.hnsw_ef_search,
            settings.vector_storage,
        )


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one ``write_batch`` did.

    ``processed``: event ids whose writes were applied by this call.
    ``duplicates``: event ids that were already recorded for the scope (by an earlier
    call or a racing worker), with the result stored then; their writes were skipped.
    ``metadata_updated``: rows whose metadata alone was replaced (``MetadataUpdate``).
    """

    processed: list[str]
    duplicates: dict[str, JsonObject]
    upserted: int
    deleted: int
    metadata_updated: int = 0


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result; ``score`` is cosine similarity (1 = same direction)."""

    id: str
    score: float
    text: str | None
    metadata: JsonObject


class InvalidWrite(InvalidEvent):
    """A write that can never be stored; ``event_id`` names the event to drop.

    The batch it was part of was not written at all: drop that event and write the
    rest again.
    """

    def __init__(self, message: str, *, event_id: str, record_id: str | None = None) -> None:
        super().__init__(message)
        self.event_id = event_id
        self.record_id = record_id

    @classmethod
    def of_row(cls, row: Row, problem: str) -> InvalidWrite:
        """``problem`` with ``row``, naming its record and event."""
        return cls.of_record(row.id, row.event_id, problem)

    @classmethod
    def of_record(cls, record_id: str, event_id: str, problem: str) -> InvalidWrite:
        """``problem`` with record ``record_id`` of event ``event_id``."""
        return cls(
            f"record {record_id!r} of event {event_id!r}: {problem}",
            event_id=event_id,
            record_id=record_id,
        )


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as stored in a collection."""

    id: str
    text: str | None
    metadata: JsonObject
    embedding: Vector
    model: str | None
    updated_at: datetime
    model_version: str | None = None
    text_hash: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Rows of a collection read in one go: row ``i`` is ``ids[i]``, ``vectors[i]``
    (float32, ``(rows, dimension)``), ``metadata[i]`` and ``models[i]``, the embedding
    model that made the row's vector (``None``: the vector was given as it is)."""

    ids: list[str]
    vectors: Vector
    metadata: list[JsonObject]
    models: list[str | None] = field(default_factory=list)

    def embedded_by(self, model: str | None) -> bool:
        """Whether ``model`` made every row's vector: only then can a text embedded
        with it stand in for a row."""
        return (
            model is not None
            and len(self.models) == len(self.ids)
            and all(m == model for m in self.models)
        )


class CollectionNotFound(PermanentError):
    """A request names a collection that does not exist (yet): retrying cannot help."""
