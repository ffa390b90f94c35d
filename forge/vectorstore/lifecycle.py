"""A collection's versions, for the re-embedding handler and ``forge collections``:
the one being built, its backfill, rollback and drop (see ``rebuild``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from psycopg_pool import ConnectionPool

from forge.vectorstore import rebuild, writer
from forge.vectorstore import versions as catalog_versions
from forge.vectorstore.naming import validate_name
from forge.vectorstore.types import CollectionVersion, IndexOptions, JsonObject, Row


class VersionLifecycle:
    """Thread-safe, on the store's connection pool (``VectorStore.versions``)."""

    def __init__(self, pool: ConnectionPool[Any], index: IndexOptions) -> None:
        self._pool = pool
        self._index = index

    def building(self, name: str) -> CollectionVersion | None:
        """The version of ``name`` being built (re-embedded), if any."""
        with self._pool.connection() as conn:
            return catalog_versions.building(conn, validate_name(name))

    def begin(
        self,
        name: str,
        model: str,
        dimension: int,
        rows_per_batch: int,
        *,
        claim: tuple[str, str] | None = None,
        result: Callable[[rebuild.Plan], JsonObject] | None = None,
        storage: str | None = None,
    ) -> rebuild.Plan | None:
        """Create a building version of ``name`` for ``model`` (with this store's HNSW
        parameters, and its storage unless ``storage`` is given) and plan its backfill;
        see ``rebuild.begin``. ``claim``: the (scope, event id) asking for it, recorded
        in the same transaction with ``result(plan)``; ``None`` when that event was
        recorded before (nothing done)."""
        with self._pool.connection() as conn, conn.transaction():
            if claim is not None and not writer.claim_events(conn, claim[0], [claim[1]], [{}]):
                return None
            index = replace(self._index, storage=storage or self._index.storage)
            plan = rebuild.begin(conn, validate_name(name), model, dimension, index, rows_per_batch)
            if claim is not None and result is not None:
                writer.record_result(conn, claim[0], claim[1], result(plan))
            return plan

    def get(self, name: str, version: int) -> CollectionVersion | None:
        with self._pool.connection() as conn:
            return catalog_versions.get_version(conn, validate_name(name), version)

    def range_rows(self, name: str, span: rebuild.Range) -> list[tuple[str, str]]:
        """(id, text) of the active version's rows in ``span`` of record ids."""
        with self._pool.connection() as conn:
            return rebuild.range_rows(conn, validate_name(name), span)

    def write_backfill(
        self,
        name: str,
        version: int,
        rows: Sequence[Row],
        event_id: str,
        scope: str,
        result: JsonObject,
    ) -> rebuild.BackfillResult:
        """Copy one backfill batch into building ``version``; see ``rebuild``."""
        with self._pool.connection() as conn:
            return rebuild.write_backfill(
                conn, validate_name(name), version, rows, event_id, scope, result
            )

    def rollback(self, name: str) -> CollectionVersion:
        """Switch ``name`` back to its previous version; returns it."""
        with self._pool.connection() as conn:
            return rebuild.rollback(conn, validate_name(name))

    def drop(self, name: str, version: int) -> CollectionVersion:
        """Delete a version that is not active (the building one included)."""
        with self._pool.connection() as conn:
            return rebuild.drop_version(conn, validate_name(name), version)
