"""PostgreSQL fixtures: one embedded server (pgvector) for the whole test session.

Use from a test module with ``pytest_plugins = ["tests.pg_fixtures"]``. Set
``FORGE_TEST_POSTGRES_URL`` to run against an existing server instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from forge.embedded_postgres import start_embedded_postgres
from forge.vectorstore import VectorStore


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("FORGE_TEST_POSTGRES_URL")
    if configured:
        yield configured
        return
    handle = start_embedded_postgres(tmp_path_factory.mktemp("pg") / "postgres")
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
