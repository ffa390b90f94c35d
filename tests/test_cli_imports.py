"""What each command imports, and how the ``forge`` program exits: the cuts behind the
cold command timings in docs/benchmarks.md ("Cold commands"), guarded.

Commands run in fresh interpreters: ``python -X importtime`` lists every module a real
command line imported, whatever the test process already holds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from forge.cli.command import Lazy
from forge.cli.parsers import build_parser
from tests.support.cli import run_forge

REPO = Path(__file__).resolve().parents[1]
# Seconds to import each on this machine's kind: torch ~2, sentence-transformers and
# scikit-learn ~3 more, mlflow ~2; redis and psycopg ~0.1 each.
ML = {"torch", "sentence_transformers", "transformers", "sklearn", "mlflow", "prefect"}
CLIENTS = {"redis", "psycopg", "psycopg_pool", "pgvector", "prometheus_client"}
_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", re.MULTILINE)


def _env(home: Path) -> dict[str, str]:
    unset = {"MLFLOW_TRACKING_URI", "MLRUN_DBPATH", "REDIS_URL", "POSTGRES_URL"}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    return {**env, "FORGE_HOME": str(home), "PYTHONPATH": str(REPO)}


def _run(home: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -X importtime ARGS``; the process and the top-level packages it imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        env=_env(home),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    return proc, {name.split(".")[0] for name in _IMPORTED.findall(proc.stderr)}


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["models", "list", "--help"],
        ["search", "--help"],
        ["predict", "--help"],
        ["serve", "--help"],
        ["worker", "--help"],
        ["publish", "--help"],
        ["env", "--help"],
        ["backup", "create", "--help"],
    ],
)
def test_building_the_parser_imports_no_command_dependencies(
    tmp_path: Path, argv: list[str]
) -> None:
    proc, imported = _run(tmp_path, "-m", "forge.cli.main", *argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: forge")
    assert imported & (ML | CLIENTS | {"numpy", "structlog", "rich"}) == set()


def test_models_list_imports_mlflow_but_no_torch_nor_clients(tmp_path: Path) -> None:
    proc, imported = _run(tmp_path, "-m", "forge.cli.main", "models", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[]\n"
    assert "mlflow" in imported
    assert imported & (ML - {"mlflow"} | CLIENTS) == set()


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("cmd_models", set()),
        ("cmd_serving", set()),
        ("cmd_predict", set()),
        ("cmd_search", CLIENTS),
        ("cmd_collections", CLIENTS),
        ("cmd_serve", CLIENTS),
        ("cmd_streams", {"redis"}),
        ("cmd_watch", {"redis"}),
        ("cmd_completions", {"redis"}),
        ("cmd_env", CLIENTS),
        ("cmd_worker", CLIENTS),
        ("cmd_docs", set()),
        ("cmd_backup", set()),
        ("cmd_tune", CLIENTS),
    ],
)
def test_command_modules_import_models_and_mlflow_only_when_they_run(
    tmp_path: Path, module: str, allowed: set[str]
) -> None:
    """Importing a command's module loads no ML library: predict and search load the
    embedding model, and predict MLflow and the trainer, once they run."""
    proc, imported = _run(tmp_path, "-c", f"import forge.cli.{module}")
    assert proc.returncode == 0, proc.stderr
    assert imported & (ML | CLIENTS) <= allowed


def test_loading_a_classifier_needs_no_scikit_learn(tmp_path: Path) -> None:
    code = "from forge.training.tasks import get_trainer; get_trainer('classifier')"
    proc, imported = _run(tmp_path, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "torch" in imported
    assert "sklearn" not in imported


def test_every_command_names_a_function_that_exists() -> None:
    parser = build_parser()
    found: list[Lazy] = []
    stack = [parser]
    while stack:
        current = stack.pop()
        run = current.get_default("run")
        if run is not None:
            found.append(run)
        for action in current._actions:
            if action.choices and isinstance(action.choices, dict):
                stack.extend(action.choices.values())
    assert len(found) == 34
    for lazy in found:
        assert callable(lazy.resolve()), lazy


# ---------------------------------------------------------------------- the quick exit


def _python(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    # Buffered, as stdout on a pipe is by default, so that nothing is written until a flush.
    env = {k: v for k, v in _env(tmp_path).items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


_EXIT_NOW = """
import atexit, sys, threading
from forge.cli.main import exit_now

released = threading.Event()

def late_writer():
    released.wait()
    print("thread", file=sys.stderr, flush=True)

threading.Thread(target=late_writer).start()
atexit.register(lambda: print("atexit", file=sys.stderr))
sys.stdout.write("the answer\\n")  # a pipe: block-buffered, still in the buffer
released.set()
exit_now(3)
"""


def test_exit_now_joins_threads_runs_atexit_and_flushes(tmp_path: Path) -> None:
    proc = _python(tmp_path, _EXIT_NOW)
    assert proc.returncode == 3
    assert proc.stdout == "the answer\n"
    assert proc.stderr == "thread\natexit\n"


_EXIT_NOW_WITH_A_POOL = """
from concurrent.futures import ThreadPoolExecutor
from forge.cli.main import exit_now

pool = ThreadPoolExecutor(1)  # never shut down: its thread waits for work
print(pool.submit(lambda: "pooled").result())
exit_now(0)
"""


def test_exit_now_stops_a_thread_pool_left_running(tmp_path: Path) -> None:
    """A pool's thread is not a daemon and waits for work until the interpreter's exit
    tells it to stop: joined without that, the program would never end."""
    proc = _python(tmp_path, _EXIT_NOW_WITH_A_POOL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "pooled\n"


_UNFLUSHABLE_STDOUT = """
import os, sys
from forge.cli.main import exit_now

reader, writer = os.pipe()
os.dup2(writer, 1)
os.close(reader)  # nobody will read: the flush at exit fails
os.close(writer)
sys.stdout.write("lost\\n")
{exit}
"""


def test_exit_now_fails_an_unflushable_stdout_as_python_does(tmp_path: Path) -> None:
    quick = _python(tmp_path, _UNFLUSHABLE_STDOUT.format(exit="exit_now(0)"))
    normal = _python(tmp_path, _UNFLUSHABLE_STDOUT.format(exit="sys.exit(0)"))
    assert normal.returncode == 120
    assert quick.returncode == normal.returncode


def test_forge_keeps_exit_codes_and_output_through_a_pipe(tmp_path: Path) -> None:
    env = {k: v for k, v in _env(tmp_path).items() if k != "PYTHONUNBUFFERED"}

    def forge(*argv: str) -> subprocess.CompletedProcess[str]:
        return run_forge(env, *argv)

    written = forge("schemas", "export", "--dir", str(tmp_path / "schemas"))
    assert written.returncode == 0, written.stderr
    listed = sorted(str(p) for p in (tmp_path / "schemas").iterdir())
    assert sorted(written.stdout.splitlines()) == listed

    malformed = forge("dlq", "show", "not-an-id")
    assert malformed.returncode == 2
    assert malformed.stdout == ""
    assert malformed.stderr.startswith("forge: error: 'not-an-id' is not a stream entry ID")
    assert malformed.stderr.count("\n") == 1

    stale = forge("docs", "export", "--check", "--dir", str(tmp_path / "docs"))
    assert stale.returncode == 1
    assert stale.stderr.startswith("forge: error: docs out of date")


def test_a_command_stops_the_embedded_redis_it_started(tmp_path: Path) -> None:
    from forge.cli.runtime import worker_may_be_running
    from forge.settings import Settings

    proc = subprocess.run(
        [sys.executable, "-m", "forge.cli.main", "status"],
        env=_env(tmp_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "embedded, started for this command" in proc.stdout
    settings = Settings.from_env({"FORGE_HOME": str(tmp_path)})
    assert not worker_may_be_running(settings), "the embedded Redis outlived the command"
