"""PostgreSQL fixtures: one embedded server (pgvector) for the whole test session.

Use from a test module with ``pytest_plugins = ["tests.pg_fixtures"]``. Set
``FORGE_TEST_POSTGRES_URL`` to run against an existing server instead.

Embedded servers keep their data outside pytest's temporary root (see
``server_dir``): run as root, the wheel starts PostgreSQL as the ``pgserver`` system
user, which reaches its data folder only while every folder above it stays open to
others. The wheel opens them once, at start, but every pytest session that starts
makes ``/tmp/pytest-of-<user>`` private again (mode 0700). A second pytest run
started during ours would cut our server off from its own files: it PANICs at its
next checkpoint ("could not open file .../global/pg_control: Permission denied"; a
``DROP DATABASE`` forces one), cannot restart, and every later connection is refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from forge.servers.embedded_postgres import start_embedded_postgres
from forge.vectorstore import VectorStore


@contextmanager
def server_dir() -> Iterator[Path]:
    """A fresh folder for an embedded server's data, removed afterwards.

    It lies in the system temporary folder, not under pytest's temporary root, which
    other pytest sessions close to the server's system user (see the module notes).
    """
    path = Path(tempfile.mkdtemp(prefix="forge-test-pg-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pg_tmp_path() -> Iterator[Path]:
    """Like ``tmp_path``, for tests that start their own embedded server."""
    with server_dir() as path:
        yield path


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    configured = os.environ.get("FORGE_TEST_POSTGRES_URL")
    if configured:
        yield configured
        return
    with server_dir() as folder:
        handle = start_embedded_postgres(folder / "postgres")
        try:
            yield handle.url
        finally:
            handle.stop()


@pytest.fixture(scope="session")
def vector_store(pg_url: str) -> Iterator[VectorStore]:
    store = VectorStore(pg_url, max_connections=8)
    store.open()
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def collection_name(vector_store: VectorStore) -> Iterator[str]:
    """A fresh collection name, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    vector_store.drop_collection(name)


@pytest.fixture
def empty_db_url(pg_url: str) -> Iterator[str]:
    """A brand-new, empty database on the test server (for migration tests)."""
    name = f"forge_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(pg_url, dbname=name)
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
