"""The embedded MLflow store: created once however many processes open it at once,
everything under FORGE_HOME, and no migration noise. Real subprocesses, real SQLite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import sqlalchemy as sa

from forge.settings import Settings
from forge.training.tracking import connect, quiet_mlflow

REPO = Path(__file__).resolve().parents[1]
PROCESSES = 3
# Imports mlflow before saying it is ready, so that every process reaches the store at
# the same moment once released: the window in which they would race.
_OPEN_WHEN_RELEASED = """
import sys
import mlflow.store.tracking.sqlalchemy_store
from forge.cli.main import main
print("ready", flush=True)
sys.stdin.readline()
sys.exit(main(["models", "list", "--json"]))
"""


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "MLRUN_DBPATH"}}
    return {**env, "FORGE_HOME": str(home), "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_processes_opening_a_fresh_store_at_once_all_succeed(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_WHEN_RELEASED],
            env=_env(home),
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    for child in children:  # the barrier: every process is ready before any goes on
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.close()
    results = [(child.wait(timeout=240), child.stdout, child.stderr) for child in children]
    for code, out, err in results:
        assert out is not None
        assert err is not None
        stderr = err.read()
        assert code == 0, stderr
        assert json.loads(out.read()) == []
        assert "Traceback" not in stderr
    assert (home / "mlflow" / "mlflow.db.lock").exists()


@pytest.mark.slow
def test_the_store_and_default_experiment_live_under_forge_home(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "forge.cli.main", "models", "list"],
        env=_env(home),
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert list(cwd.iterdir()) == []
    assert "UserWarning" not in proc.stderr
    default = connect(Settings(home_dir=home)).get_experiment("0")
    assert default.name == "Default"
    assert default.artifact_location == (home / "mlflow" / "artifacts" / "0").resolve().as_uri()


def test_alembic_unnamed_check_constraint_warning_alone_is_silenced(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'checks.db'}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        _rebuild_table_with_unnamed_check(engine, "before")
        assert _unnamed_check_warnings(caught), "the rebuild no longer warns: test is moot"
        caught.clear()
        quiet_mlflow()
        _rebuild_table_with_unnamed_check(engine, "after")
        assert _unnamed_check_warnings(caught) == []
        # Targeted: the same text from elsewhere, and alembic's other warnings, still show.
        message = "Unnamed CHECK constraint on reflected table 't'"
        warnings.warn_explicit(message, UserWarning, "other.py", 1, module="other")
        warnings.warn_explicit("other", UserWarning, "batch.py", 1, module="alembic.operations")
        assert [str(w.message) for w in caught] == [message, "other"]
    engine.dispose()


def _rebuild_table_with_unnamed_check(engine: sa.Engine, table: str) -> None:
    """What MLflow's SQLite migrations do: alembic's batch mode recreating a reflected
    table that has an unnamed CHECK constraint (which the rebuild drops: one per table)."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    with engine.begin() as connection:
        connection.execute(sa.text(f"CREATE TABLE {table} (x INTEGER, CHECK (x > 0))"))
        operations = Operations(MigrationContext.configure(connection))
        with operations.batch_alter_table(table, recreate="always") as batch:
            batch.add_column(sa.Column("y", sa.Integer))


def _unnamed_check_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "Unnamed CHECK constraint" in str(w.message)]
