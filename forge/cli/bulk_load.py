"""``forge collections load``: records from a JSON-lines file, embedded in chunks and
copied into a new collection whose HNSW index is built once at the end."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np

from forge.embedding.model import Embedder
from forge.embedding.service import EmbeddingService
from forge.errors import InvalidEvent, UsageError
from forge.events import Record
from forge.settings import Settings
from forge.vectorstore import Row, VectorStore
from forge.vectorstore.bulk import BulkLoadResult, IndexBuild

# Records embedded and copied per transaction.
CHUNK_RECORDS = 2048
LOAD_EVENT = "bulk-load"


def load_file(store: VectorStore, settings: Settings, args: argparse.Namespace) -> BulkLoadResult:
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    records = list(_records(path))
    if not records:
        raise UsageError(f"{path}: no records")
    embedder = None
    if any(r.vector is None for r in records):
        embedder = EmbeddingService.from_settings(settings, None).embedder(args.model)
    dimension = embedder.dimension if embedder else len(records[0].vector or ())
    build = IndexBuild(args.index_memory, args.index_workers)
    model = embedder.name if embedder else None
    chunks = _chunks(records, embedder)
    return store.bulk_load(args.collection, dimension, model, chunks, build, args.storage)


def _records(path: Path) -> Iterator[Record]:
    decoder = msgspec.json.Decoder(Record)
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = decoder.decode(line)
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
                raise InvalidEvent(f"{path}:{number}: {exc}") from None
            if record.deleted:
                raise InvalidEvent(f"{path}:{number}: a load has no deletes")
            yield record


def _chunks(records: list[Record], embedder: Embedder | None) -> Iterator[list[Row]]:
    for start in range(0, len(records), CHUNK_RECORDS):
        chunk = records[start : start + CHUNK_RECORDS]
        texts = [r.text for r in chunk if r.vector is None and r.text is not None]
        vectors = iter(embedder.encode(texts, CHUNK_RECORDS) if embedder and texts else ())
        rows = []
        for record in chunk:
            if record.vector is not None:
                rows.append(
                    Row(
                        record.id,
                        np.asarray(record.vector, dtype=np.float32),
                        LOAD_EVENT,
                        record.text,
                        record.metadata,
                    )
                )
            else:
                assert embedder is not None  # loaded when any record has no vector
                rows.append(
                    Row(
                        record.id,
                        next(vectors),
                        LOAD_EVENT,
                        record.text,
                        record.metadata,
                        embedder.name,
                        embedder.version,
                    )
                )
        yield rows
