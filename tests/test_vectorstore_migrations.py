from __future__ import annotations

import threading

import psycopg
import pytest

from forge.vectorstore.migrations import MIGRATIONS, Migration, apply_migrations, migrate
from forge.vectorstore.migrations import schema_version as current_version

pytestmark = pytest.mark.postgres

LATEST = MIGRATIONS[-1].version


def _ledger(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version FROM forge_schema_migrations ORDER BY 1").fetchall()
    return [r[0] for r in rows]


def test_migrations_are_idempotent(empty_db_url: str) -> None:
    assert migrate(empty_db_url) == [m.version for m in MIGRATIONS]
    assert migrate(empty_db_url) == []
    assert _ledger(empty_db_url) == [m.version for m in MIGRATIONS]
    with psycopg.connect(empty_db_url) as conn:
        assert current_version(conn) == LATEST
        conn.execute("SELECT '[1,2,3]'::vector <=> '[1,2,4]'::vector").fetchone()


def test_concurrent_workers_migrate_once(empty_db_url: str) -> None:
    workers = 6
    barrier = threading.Barrier(workers)
    applied: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            applied.append(migrate(empty_db_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(v for versions in applied for v in versions) == [m.version for m in MIGRATIONS]
    assert _ledger(empty_db_url) == [m.version for m in MIGRATIONS]


def test_later_migrations_apply_in_order_and_failures_roll_back(empty_db_url: str) -> None:
    migrate(empty_db_url)
    extra = (
        Migration(LATEST + 1, "add a table", ("CREATE TABLE forge_test_extra (x int)",)),
        Migration(LATEST + 2, "broken", ("CREATE TABLE forge_test_x (y int)", "SELECT 1/0")),
    )
    with psycopg.connect(empty_db_url) as conn, pytest.raises(psycopg.errors.DivisionByZero):
        apply_migrations(conn, (*MIGRATIONS, *extra))
    # The whole run is one transaction: nothing of it stays.
    assert _ledger(empty_db_url) == [m.version for m in MIGRATIONS]
    with psycopg.connect(empty_db_url) as conn:
        assert apply_migrations(conn, (*MIGRATIONS, extra[0])) == [LATEST + 1]
        assert conn.execute("SELECT to_regclass('forge_test_x')").fetchone() == (None,)


def test_migrations_must_be_ordered(empty_db_url: str) -> None:
    shuffled = (Migration(2, "b", ()), Migration(1, "a", ()))
    with psycopg.connect(empty_db_url) as conn, pytest.raises(ValueError, match="ascending"):
        apply_migrations(conn, shuffled)


def test_migration_2_gives_existing_collections_row_fingerprints(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url) as conn:
        apply_migrations(conn, MIGRATIONS[:1])
        # A collection table as Forge created them before migration 2.
        conn.execute(
            "CREATE TABLE coll_old (id text PRIMARY KEY, text text, metadata jsonb NOT NULL"
            " DEFAULT '{}', embedding vector(3) NOT NULL, model text,"
            " updated_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("INSERT INTO forge_collections VALUES ('old', 'coll_old', 3, 'm')")
        conn.execute("INSERT INTO coll_old (id, text, embedding) VALUES ('a', 'x', '[1,0,0]')")
        conn.commit()
        assert 2 in apply_migrations(conn)
        row = conn.execute("SELECT id, model_version, text_hash FROM coll_old").fetchone()
    assert row == ("a", None, None)
