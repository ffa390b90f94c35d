"""A local SQLite MLflow store (the embedded default), created or upgraded once.

MLflow creates a missing schema, running every migration, in whichever process opens
the store first, and nothing keeps two processes apart: two ``forge models list``
started together on a fresh ``FORGE_HOME`` both migrate and one of them fails (alembic's
"expected to match one row", or "table _alembic_tmp_experiments already exists"). A
file lock beside the database lets one process create or upgrade it while the others
wait; once the store is complete, each only checks that under the lock.

The store is created with its artifact root, so MLflow's ``Default`` experiment lands
under that root instead of in ``./mlruns`` of whatever directory the process runs in.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from forge.errors import TransientError

log = structlog.get_logger(__name__)

# Creating a store takes seconds; a holder this late is hung, not busy. A dead holder
# is no problem: the kernel drops its lock.
LOCK_TIMEOUT_S = 300.0


def lock_path(database: Path) -> Path:
    return database.with_name(f"{database.name}.lock")


def prepare(uri: str, database: Path, artifact_root: Path) -> None:
    """Create the store at ``uri`` (the SQLite file ``database``) unless it is complete,
    holding the lock; waits while another process creates it."""
    from filelock import FileLock, Timeout

    artifact_root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path(database), timeout=LOCK_TIMEOUT_S)
    try:
        with lock:
            if not _complete(uri):
                _create(uri, artifact_root)
    except Timeout:
        raise TransientError(
            f"the MLflow store {database} is still locked by another process after"
            f" {LOCK_TIMEOUT_S:g}s (lock file {lock.lock_file})"
        ) from None


def _complete(uri: str) -> bool:
    """Whether every table of this MLflow's schema exists: MLflow's own test before it
    creates or migrates a store (a few milliseconds, where opening one takes ~50)."""
    from mlflow.store.db import utils as db_utils

    engine = db_utils.create_sqlalchemy_engine_with_retry(uri)  # type: ignore[no-untyped-call]
    try:
        return bool(db_utils._all_tables_exist(engine))  # type: ignore[no-untyped-call]
    finally:
        engine.dispose()


def _create(uri: str, artifact_root: Path) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    # Opening the store creates its tables, or runs the migrations a store made by an
    # older MLflow lacks, and creates the Default experiment at ``<artifact_root>/0``
    # (the client's own store would put it under ./mlruns).
    SqlAlchemyStore(uri, artifact_root.as_uri())  # type: ignore[no-untyped-call]
    log.info("MLflow store ready", uri=uri, artifact_root=str(artifact_root))
