"""``VectorStore``: collections of embeddings in PostgreSQL with pgvector.

Connections come from a ``psycopg_pool.ConnectionPool``. When the server is down,
calls raise ``psycopg.OperationalError`` or ``psycopg_pool.PoolTimeout``, which
Forge's runtime treats as transient.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any

import numpy as np
import psycopg
import structlog
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool

from forge.errors import PermanentError
from forge.settings import Settings
from forge.vectorstore import (
    bulk,
    catalog,
    content,
    deferred,
    inventory,
    rebuild,
    scan,
    search,
    versions,
    writer,
)
from forge.vectorstore.bulk import BulkLoadResult
from forge.vectorstore.inventory import CollectionInfo
from forge.vectorstore.lifecycle import VersionLifecycle
from forge.vectorstore.migrations import migrate
from forge.vectorstore.naming import validate_name
from forge.vectorstore.rebuild import VersionsChanged
from forge.vectorstore.types import (
    Collection,
    CollectionNotFound,
    Fingerprint,
    Hit,
    IndexOptions,
    InvalidWrite,
    JsonObject,
    Row,
    Snapshot,
    StoredRecord,
    Vector,
    VersionWrites,
    Write,
    WriteResult,
)

log = structlog.get_logger(__name__)


# pgvector's iterative index scans (filtered search that still returns k rows).
_ITERATIVE_SCAN_SINCE = (0, 8)


def _configure(conn: psycopg.Connection[Any]) -> None:
    register_vector(conn)
    conn.execute(writer.CREATE_STAGING)


class VectorStore:
    """Thread-safe; open it once per process and share it.

    ``index``: HNSW parameters of the collections it creates and of its searches
    (default: pgvector's).
    """

    def __init__(
        self,
        url: str,
        *,
        min_connections: int = 1,
        max_connections: int = 4,
        timeout_s: float = 10.0,
        connect_timeout_s: int = 10,
        index: IndexOptions | None = None,
    ) -> None:
        self._url = url
        self._index = index or IndexOptions()
        self._connect_timeout_s = connect_timeout_s
        self._pool = ConnectionPool(
            url,
            min_size=min_connections,
            max_size=max_connections,
            timeout=timeout_s,
            open=False,
            configure=_configure,
            check=ConnectionPool.check_connection,
            kwargs={"autocommit": True, "connect_timeout": connect_timeout_s},
            name="forge-vectorstore",
        )
        self._iterative_scan = False
        self.versions = VersionLifecycle(self._pool, self._index)
        self.indexes = deferred.DeferredIndexes(url, self._pool, connect_timeout_s)

    @classmethod
    def from_settings(cls, url: str, settings: Settings, **pool: Any) -> VectorStore:
        """A store at ``url`` with the HNSW parameters of ``settings``; ``pool``: the
        other keyword arguments of the constructor."""
        return cls(url, index=IndexOptions.from_settings(settings), **pool)

    @property
    def url(self) -> str:
        """The PostgreSQL server and database (a hyperparameter study is kept there too)."""
        return self._url

    @property
    def index(self) -> IndexOptions:
        return self._index

    # ---------------------------------------------------------------- lifecycle

    def open(self, *, timeout_s: float = 30.0) -> None:
        """Apply pending migrations, then open the pool."""
        applied = migrate(self._url, connect_timeout_s=self._connect_timeout_s)
        if applied:
            log.info("vector store schema migrated", versions=applied)
        self._pool.open(wait=True, timeout=timeout_s)
        with self._pool.connection() as conn:
            self._iterative_scan = _pgvector_version(conn) >= _ITERATIVE_SCAN_SINCE

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> VectorStore:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -------------------------------------------------------------- collections

    def ensure_collection(self, name: str, dimension: int, model: str | None = None) -> Collection:
        """Create collection ``name`` if needed; ``InvalidEvent`` on a dimension clash."""
        with self._pool.connection() as conn:
            return catalog.ensure_collection(conn, name, dimension, model, self._index)

    def collection(self, name: str) -> Collection | None:
        # Read every time, never cached: a re-embedding switches the active version
        # under every process at once.
        with self._pool.connection() as conn:
            return catalog.get_collection(conn, validate_name(name))

    def describe(self, name: str) -> CollectionInfo:
        """Collection ``name``'s versions, rows, model, index and size on disk;
        ``CollectionNotFound`` when there is none."""
        with self._pool.connection() as conn:
            found = catalog.get_collection(conn, validate_name(name))
            if found is None:
                raise CollectionNotFound(f"collection {name!r} does not exist")
            return inventory.describe(conn, found)

    def describe_all(self) -> list[CollectionInfo]:
        """Every collection, as ``describe`` tells it, by name."""
        with self._pool.connection() as conn:
            names = inventory.collection_names(conn)
            found = [catalog.get_collection(conn, name) for name in names]
            return [inventory.describe(conn, c) for c in found if c is not None]

    def bulk_load(
        self,
        name: str,
        dimension: int,
        model: str | None,
        chunks: Iterable[Sequence[Row]],
        build: bulk.IndexBuild,
        storage: str | None = None,
    ) -> BulkLoadResult:
        """A new collection's first load: rows copied without the HNSW index, which is
        then built once (see ``bulk``); ``PermanentError`` if it has rows already."""
        index = replace(self._index, storage=storage or self._index.storage)
        name = validate_name(name)
        with self._pool.connection() as conn:
            return bulk.first_load(conn, name, dimension, model, chunks, index, build)

    def drop_collection(self, name: str) -> bool:
        with self._pool.connection() as conn:
            return catalog.drop_collection(conn, validate_name(name))

    # ------------------------------------------------------------------- writes

    def already_processed(self, scope: str, event_ids: Iterable[str]) -> dict[str, JsonObject]:
        """Which of ``event_ids`` were written before under ``scope``, with their results.

        Lets the caller skip work (embedding) for redelivered events; ``write_batch``
        still guards against races on its own.
        """
        with self._pool.connection() as conn:
            return writer.already_processed(conn, scope, event_ids)

    def write_batch(
        self,
        collection: str,
        writes: Sequence[Write],
        event_ids: Sequence[str],
        scope: str,
        *,
        model: str | None = None,
        results: Mapping[str, Mapping[str, Any]] | None = None,
        version: int | None = None,
        building: VersionWrites | None = None,
        defer_index: bool = False,
    ) -> WriteResult:
        """Apply ``writes`` (upserts and deletes, in order) exactly once per event.

        ``event_ids`` are the batch's input events, all distinct; each write names one.
        Events already recorded under ``scope`` are skipped and reported in
        ``WriteResult.duplicates``. ``results`` adds fields to the per-event result
        stored with each marker. The first upsert creates the collection (dimension
        from the vector, ``model`` or the row's model recorded). Raises
        ``InvalidWrite`` (an ``InvalidEvent``) naming the offending event; nothing
        of the batch is written then.

        ``version``: the active version ``writes`` were made for; ``building``: the
        same writes for the version being built (embedded by its model). While a
        version is being built every write goes to both; ``VersionsChanged`` (a
        transient error) when the versions are no longer those, so the caller makes
        its writes again for the new ones.

        ``defer_index``: a collection this batch creates starts without its HNSW index,
        for a worker to build once its first load is over (``indexes``).
        """
        name = validate_name(collection)
        writer.check_batch(writes, event_ids)
        if not event_ids:
            return WriteResult(processed=[], duplicates={}, upserted=0, deleted=0)
        rows = [write for write in writes if isinstance(write, Row)]
        with self._pool.connection() as conn, conn.transaction():
            # Held to the commit: a version is not created or switched meanwhile.
            existing = rebuild.lock_catalog(conn, name)
            if existing is not None and version is not None and existing.version != version:
                raise VersionsChanged(f"collection {name!r} switched to version {existing.version}")
            if rows:
                dimension = existing.dimension if existing else _dimension_of(rows[0])
                writer.check_rows(rows, dimension)
            # Created in the write's transaction: a batch rejected while it is
            # written (a NUL in a text) must not leave an empty collection behind.
            target = existing or self._create_for(conn, name, rows, model, defer_index)
            result = writer.write_claimed(conn, target, writes, event_ids, scope, results)
            if existing is not None:
                _write_building(conn, name, building, set(result.processed), version)
        return result

    def prune_processed(self, older_than_s: float, scope: str | None = None) -> int:
        """Forget processed-event markers older than ``older_than_s``; returns how many."""
        query = (
            "DELETE FROM forge_processed_events"
            " WHERE processed_at < now() - make_interval(secs => %s)"
            " AND (%s::text IS NULL OR scope = %s)"
        )
        with self._pool.connection() as conn:
            return conn.execute(query, [older_than_s, scope, scope]).rowcount

    # -------------------------------------------------------------------- reads

    def search(
        self,
        collection: str,
        vector: Vector,
        k: int,
        filters: Mapping[str, Any] | None = None,
    ) -> list[Hit]:
        """Up to ``k`` records nearest to ``vector`` (cosine), best first; see ``search``."""
        if k <= 0:
            return []
        for attempt in (1, 2):
            target = self.collection(collection)
            if target is None:
                return []
            catalog.check_dimension(target, int(np.size(vector)))
            try:
                with self._pool.connection() as conn:
                    return search.search(
                        conn,
                        target,
                        vector,
                        k,
                        filters,
                        ef_search=self._index.ef_search,
                        iterative_scan=self._iterative_scan,
                    )
            except psycopg.errors.UndefinedTable:
                # The version read was dropped after a switch: read the catalog again.
                if attempt == 2:
                    raise
        return []

    def fingerprints(self, collection: str, ids: Iterable[str]) -> dict[str, Fingerprint]:
        """What the stored rows among ``ids`` were made from (text hash, model, metadata);
        ids not stored, or an unknown collection, are left out."""
        target = self.collection(collection)
        if target is None:
            return {}
        with self._pool.connection() as conn:
            return content.fingerprints(conn, target, ids)

    def fetch(self, collection: str, ids: Iterable[str]) -> dict[str, StoredRecord]:
        target = self.collection(collection)
        if target is None:
            return {}
        with self._pool.connection() as conn:
            return search.fetch(conn, target, ids)

    def count(self, collection: str) -> int:
        target = self.collection(collection)
        if target is None:
            return 0
        with self._pool.connection() as conn:
            return search.count(conn, target)

    def load_collection(self, name: str, ids: Sequence[str] | None = None) -> Snapshot:
        """Every row of collection ``name`` (or those in ``ids``), ordered by id, with
        vectors as one matrix; ``CollectionNotFound`` when there is no such collection."""
        target = self._require(name)
        with self._pool.connection() as conn:
            return scan.load_rows(conn, target, ids)

    def update_metadata(self, name: str, patches: Mapping[str, JsonObject]) -> int:
        """Merge ``patches[id]`` into each record's metadata; returns the rows patched."""
        target = self._require(name)
        with self._pool.connection() as conn:
            return scan.merge_metadata(conn, target, patches)

    # ------------------------------------------------------------------ helpers

    def _require(self, name: str) -> Collection:
        target = self.collection(name)
        if target is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        return target

    def _create_for(
        self,
        conn: psycopg.Connection[Any],
        name: str,
        rows: Sequence[Row],
        model: str | None,
        defer_index: bool,
    ) -> Collection | None:
        """The collection a first upsert creates (or a racing writer created); ``None``
        when there are only deletes."""
        if not rows:
            return None
        dimension, model = _dimension_of(rows[0]), model or rows[0].model
        return catalog.ensure_collection(
            conn, name, dimension, model, self._index, with_index=not defer_index
        )


def _write_building(
    conn: psycopg.Connection[Any],
    name: str,
    building: VersionWrites | None,
    processed: set[str],
    version: int | None,
) -> None:
    """Apply the writes of the version being built, if there is one."""
    current = versions.building(conn, name)
    if current is None:
        return  # none, or the one written for was dropped
    if building is None or building.version != current.version:
        message = f"collection {name!r} is building version {current.version}"
        if version is None:
            raise PermanentError(f"{message}: writes must come for both versions")
        raise VersionsChanged(message)
    target = Collection(
        name, current.table, current.dimension, current.model, current.version, current.storage
    )
    upserts = [w for w in building.writes if isinstance(w, Row) and w.event_id in processed]
    writer.check_rows(upserts, current.dimension)
    writer.apply_writes(conn, target, building.writes, processed)


def _dimension_of(row: Row) -> int:
    shape = np.shape(row.embedding)
    if len(shape) != 1:
        raise InvalidWrite.of_row(row, f"vector shape {shape} is not 1-d")
    return int(shape[0])


def _pgvector_version(conn: psycopg.Connection[Any]) -> tuple[int, ...]:
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    if not row:
        return ()
    return tuple(int(part) for part in str(row[0]).split(".") if part.isdigit())
