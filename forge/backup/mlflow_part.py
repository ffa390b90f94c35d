"""The MLflow part of a backup: runs, the model registry (versions and aliases) and the
models' files.

- A SQLite store (the embedded default, or ``sqlite:///`` configured): a consistent
  copy of the database through SQLite's online backup API, then its ``artifacts``
  folder as a tar archive. The database first: MLflow writes a version's files before
  its registry row, so every version the copy holds has its files in the archive.
  Restored under another path, the artifact locations the database records are moved
  to the new folder.
- A PostgreSQL store (``postgresql://``): pg_dump of its database. Its artifacts are
  wherever its server was told to put them (a volume, a bucket): back them up there.
- A tracking server (``http(s)://``) is backed up with its own tools: ``forge backup``
  refuses it unless told ``--exclude mlflow``.
"""

from __future__ import annotations

import shutil
import sqlite3
import tarfile
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from forge.backup import pgtools
from forge.backup.manifest import BackupError, Part, describe_file
from forge.settings import Settings
from forge.settings_values import redact_url
from forge.training import sqlite_store
from forge.training.tracking import (
    ARTIFACTS_DIR,
    artifact_root,
    quiet_mlflow,
    sqlite_database,
    tracking_uri,
)

DB_FILE = "mlflow.db"
ARTIFACTS_FILE = "mlflow-artifacts.tar.gz"
DUMP_FILE = "mlflow.dump"
# Where MLflow's SQLite schema records artifact URIs (MLflow 3).
_URI_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)
# Tables whose rows are a store's content (the Default experiment does not count).
_CONTENT_QUERIES = (
    "SELECT count(*) FROM runs",
    "SELECT count(*) FROM registered_models",
    "SELECT count(*) FROM experiments WHERE experiment_id <> 0",
)


@dataclass(frozen=True, slots=True)
class Store:
    """Where the tracking store is: a SQLite file, or a PostgreSQL database."""

    uri: str
    database: Path | None = None
    postgres_url: str | None = None

    @property
    def artifacts(self) -> Path | None:
        return artifact_root(self.uri)


def locate(settings: Settings) -> Store:
    uri = tracking_uri(settings)
    database = sqlite_database(uri)
    if database is not None:
        return Store(uri, database=database)
    parts = urlsplit(uri)
    if parts.scheme.split("+")[0] in {"postgresql", "postgres"}:
        # SQLAlchemy's ``postgresql+psycopg2://`` is libpq's ``postgresql://``.
        return Store(uri, postgres_url=urlunsplit(("postgresql", *parts[1:])))
    raise BackupError(
        f"cannot back up the MLflow store at {redact_url(uri)}: back up its server's backend"
        " and artifact stores with their own tools, and pass --exclude mlflow"
    )


def dump(settings: Settings, store: Store, folder: Path) -> Part:
    source = redact_url(store.uri) or ""
    if store.postgres_url is not None:
        server = pgtools.inspect(store.postgres_url)
        pgtools.pg_dump(settings, server, folder / DUMP_FILE)
        files = [describe_file(folder, DUMP_FILE)]
        return Part(
            name="mlflow",
            format="pg_dump-custom",
            server_version=server.version,
            source=source,
            files=files,
        )
    database, artifacts = _sqlite_paths(store)
    # A store never opened yet is created, so that every backup has the same parts.
    quiet_mlflow()
    sqlite_store.prepare(store.uri, database, artifacts)
    _copy_database(database, folder / DB_FILE)
    with tarfile.open(folder / ARTIFACTS_FILE, "w:gz") as archive:
        archive.add(artifacts, arcname=ARTIFACTS_DIR)
    return Part(
        name="mlflow",
        format="sqlite+tar",
        server_version=f"mlflow {_mlflow_version()}, SQLite {sqlite3.sqlite_version}",
        source=source,
        files=[describe_file(folder, DB_FILE), describe_file(folder, ARTIFACTS_FILE)],
        artifact_root=artifacts.as_uri(),
    )


def contents(store: Store) -> str | None:
    """What the store holds that a restore would overwrite; None when nothing."""
    if store.postgres_url is not None:
        with psycopg.connect(store.postgres_url, connect_timeout=pgtools.CONNECT_TIMEOUT_S) as c:
            return _content(lambda q: _first(c.execute(q).fetchone()), store)
    database, artifacts = _sqlite_paths(store)
    if database.exists():
        with closing(sqlite3.connect(database)) as conn:
            found = _content(lambda q: _first(conn.execute(q).fetchone()), store)
        if found:
            return found
    if artifacts.exists() and any(p.name != "0" for p in artifacts.iterdir()):
        return f"the MLflow artifact folder {artifacts} is not empty"
    return None


def restore(settings: Settings, store: Store, folder: Path, part: Part) -> None:
    """Put the store back; ``force``d restores have had ``clear`` first."""
    if store.postgres_url is not None:
        _require_format(part, "pg_dump-custom", store)
        server = pgtools.inspect(store.postgres_url)
        pgtools.pg_restore(settings, server, folder / DUMP_FILE, part.server_version)
        return
    _require_format(part, "sqlite+tar", store)
    database, artifacts = _sqlite_paths(store)
    database.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    # The lock every Forge process takes to create or upgrade the store.
    with FileLock(sqlite_store.lock_path(database), timeout=sqlite_store.LOCK_TIMEOUT_S):
        _copy_database(folder / DB_FILE, database)
        shutil.rmtree(artifacts, ignore_errors=True)
        _extract(folder / ARTIFACTS_FILE, database.parent)
        if part.artifact_root and part.artifact_root != artifacts.as_uri():
            _move_artifact_uris(database, part.artifact_root, artifacts.as_uri())


def _sqlite_paths(store: Store) -> tuple[Path, Path]:
    database, artifacts = store.database, store.artifacts
    # A SQLite store has both.
    assert database is not None
    assert artifacts is not None
    return database, artifacts


def _copy_database(source: Path, target: Path) -> None:
    """Copy with SQLite's online backup: a consistent snapshot, even of a database
    another process is writing, taken page by page under SQLite's own locking."""
    try:
        with (
            closing(sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True)) as src,
            closing(sqlite3.connect(target)) as dst,
        ):
            src.backup(dst)
    except sqlite3.Error as exc:
        raise BackupError(f"copying the MLflow store {source} to {target}: {exc}") from None


def _extract(archive_path: Path, into: Path) -> None:
    # The "data" filter refuses links out of the folder, absolute paths and devices.
    try:
        with tarfile.open(archive_path, "r:gz") as archive:
            archive.extractall(into, filter="data")
    except tarfile.TarError as exc:
        raise BackupError(f"extracting {archive_path}: {exc}") from None


def _move_artifact_uris(database: Path, old: str, new: str) -> None:
    """Point the artifact URIs under ``old`` at ``new``, in one transaction."""
    with closing(sqlite3.connect(database)) as conn, conn:
        for table, column in _URI_COLUMNS:
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                continue  # a store made by an MLflow without it; upgraded on first use
            conn.execute(
                f"UPDATE {table} SET {column} = ? || substr({column}, ?)"
                f" WHERE substr({column}, 1, ?) = ?",
                (new, len(old) + 1, len(old), old),
            )


def _content(count: Callable[[str], int], store: Store) -> str | None:
    for query in _CONTENT_QUERIES:
        try:
            if int(count(query)) > 0:
                return f"the MLflow store {redact_url(store.uri)} has runs or models"
        except (sqlite3.OperationalError, psycopg.errors.UndefinedTable):
            return None  # no MLflow schema yet
    return None


def _first(row: tuple[object, ...] | None) -> int:
    return int(str(row[0])) if row else 0


def _require_format(part: Part, expected: str, store: Store) -> None:
    if part.format != expected:
        raise BackupError(
            f"the backup's MLflow part is {part.format}, the store at"
            f" {redact_url(store.uri)} needs {expected}"
        )


def _mlflow_version() -> str:
    from importlib.metadata import version

    return version("mlflow")
