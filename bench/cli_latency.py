"""Benchmark: how long one-shot commands take, start to exit, as a user runs them.

    .venv/bin/python bench/cli_latency.py [--repeat 5] [--checkout PATH ...]

Sets up a fresh ``FORGE_HOME`` (and ``HOME``) the way the README's quick start does: a
``forge worker --http-port 0`` on the embedded Redis and PostgreSQL, ``forge publish
forge:new-data @examples/new-data.json --wait``, then the README's ``ticket-queue``
training request, also with ``--wait``. With the worker idle (the embedded servers up,
as when a user searches beside a running worker) it runs each command once untimed
(bytecode caches written, files in the page cache), then ``--repeat`` times,
interleaved, and prints the median and the fastest wall time and the median CPU time
(user + system, children included) of each. Every command is a new process, as from
a shell, with stdout on /dev/null and stderr on a pipe, started in the temporary
folder: ``python -m`` puts its working directory first on ``sys.path``, which would
otherwise shadow the tree on ``PYTHONPATH``.

``--checkout`` (repeatable) times the same commands with another source tree's ``forge``
on ``PYTHONPATH``, alternating with this one run by run, so that a before/after
comparison sees the same machine load. The worker and the set-up always run this tree.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINING_REQUEST = {
    "type": "training-request",
    "id": "t1",
    "model": "ticket-queue",
    "task": "classifier",
    "collection": "tickets",
    "params": {"label_field": "queue", "min_rows": 4},
}
COMMANDS: dict[str, list[str]] = {
    "forge --help": ["--help"],
    "forge models list": ["models", "list"],
    "forge models show ticket-queue": ["models", "show", "ticket-queue"],
    "forge search tickets ... -k 3": ["search", "tickets", "refund for a broken order", "-k", "3"],
    "forge predict ticket-queue@champion --text ...": [
        "predict",
        "ticket-queue@champion",
        "--text",
        "my parcel never arrived",
    ],
}
SETUP_TIMEOUT_S = 600.0

# (tree, command) -> (wall s, CPU s) of each timed run
Results = dict[tuple[Path, str], list[tuple[float, float]]]


def forge(tree: Path, home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forge.cli.main", *argv],
        env=_env(tree, home),
        cwd=home,
        capture_output=True,
        text=True,
        check=True,
    )


def timed(tree: Path, home: Path, argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one command, from fork to exit."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "forge.cli.main", *argv],
        env=_env(tree, home),
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # The pipe is read after the exit: a command that writes more than a pipe holds
    # (64 KiB) to stderr would block, and none of these does.
    _, status, usage = os.wait4(process.pid, 0)
    wall_s = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.stderr:
        process.stderr.close()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({process.returncode}): {stderr}")
    return wall_s, usage.ru_utime + usage.ru_stime


def start_worker(home: Path) -> subprocess.Popen[bytes]:
    log = home / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "forge.cli.main", "worker", "--http-port", "0"],
        env=_env(REPO, home),
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )

    def started() -> bool:
        return worker.poll() is not None or b"worker started" in log.read_bytes()

    # Publish once the worker runs the embedded Redis: a `forge publish` that started it
    # would find no worker (--wait refuses to wait then).
    _wait_for(started, "the worker to start")
    if worker.poll() is not None:
        raise SystemExit(f"the worker exited: {log.read_text()[-2000:]}")
    return worker


def load_examples(home: Path) -> None:
    """The example collection embedded and ``ticket-queue`` trained, by the worker."""
    timeout = ("--wait", "--timeout", f"{SETUP_TIMEOUT_S:g}")
    examples = REPO / "examples" / "new-data.json"
    forge(REPO, home, "publish", "forge:new-data", f"@{examples}", *timeout)
    forge(REPO, home, "publish", "training-requests", json.dumps(TRAINING_REQUEST), *timeout)


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what} after {SETUP_TIMEOUT_S:g}s")
        time.sleep(1)


def _env(tree: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORGE_", "REDIS_"))}
    # As from a user's shell: the embedded servers, buffered output, bytecode caches.
    unset = ("POSTGRES_URL", "MLFLOW_TRACKING_URI", "MLRUN_DBPATH")
    for name in (*unset, "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"):
        env.pop(name, None)
    return {
        **env,
        "FORGE_HOME": str(home / "forge"),
        "HOME": str(home / "user"),
        "PYTHONPATH": str(tree),
    }


def run(trees: list[Path], home: Path, repeat: int) -> Results:
    results: Results = {(tree, name): [] for tree in trees for name in COMMANDS}
    for argv in COMMANDS.values():
        for tree in trees:
            timed(tree, home, argv)  # warm-up, not counted
    for _ in range(repeat):
        for name, argv in COMMANDS.items():
            for tree in trees:
                results[tree, name].append(timed(tree, home, argv))
    return results


def report(results: Results) -> None:
    print("| command | tree | median wall s | fastest wall s | median CPU s |")
    print("|---|---|---:|---:|---:|")
    for (tree, name), runs in results.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        median_wall, fastest = statistics.median(walls), min(walls)
        median_cpu = statistics.median(cpus)
        print(f"| `{name}` | {tree.name} | {median_wall:.2f} | {fastest:.2f} | {median_cpu:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--checkout", action="append", type=Path, default=[])
    args = parser.parse_args()
    trees = [REPO, *(path.resolve() for path in args.checkout)]
    with tempfile.TemporaryDirectory(prefix="forge-cli-latency-") as tmp:
        home = Path(tmp)
        (home / "user").mkdir()
        worker = start_worker(home)
        try:
            load_examples(home)
            results = run(trees, home, args.repeat)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=120)
    report(results)


if __name__ == "__main__":
    main()
