"""Shared machinery of ``bench/chaos.py``, ``bench/soak.py`` and ``tests/test_chaos.py``.

Everything runs against servers this module starts in a folder of its own: a
``redis-server`` with an append-only file (``appendfsync everysec``, Forge's embedded
configuration) and an embedded PostgreSQL with pgvector. The machine's shared Redis and
PostgreSQL are never touched, so the chaos (SIGKILLed workers, a Redis restart, a
PostgreSQL outage) hits nobody else.

Pieces, a module each: ``_servers`` (start, restart, stop both servers), ``_workers``
(``forge worker`` subprocesses: spawn, SIGKILL, replace, drain), ``_workload`` (valid
and poison events, remembered by the input entry id Redis gave them, and the
completions read back), ``_checks`` (the end-of-run checks and ``leaked_processes``)
and ``_common``. This module runs a run: ``run_supervised`` gives it a ``Harness``
(the harness's own connections, what it published and the completions it read),
always cleans up after it, and its ``RunReport`` is what ``print_report`` prints.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import tempfile
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script

from bench._checks import Check, Verification, leaked_processes, verify
from bench._common import GROUP, PREFIX, connect, log
from bench._servers import Servers
from bench._workers import Workers
from bench._workload import CompletionReader, Ledger
from forge.keys import Keys
from forge.vectorstore import VectorStore


def create_group(client: redis.Redis, stream: str) -> None:
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: already there
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)


def open_store(url: str) -> VectorStore:
    store = VectorStore(url, max_connections=2)
    store.open()
    return store


def print_table(rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print("-" * (width + 24))
    for name, value in rows:
        print(f"{name:<{width}}  {value:>20}")
    print("-" * (width + 24))


def print_checks(checks: Sequence[Check]) -> None:
    for check in checks:
        print(f"  [{'PASS' if check.ok else 'FAIL'}] {check.name}: {check.detail}")


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so ``finally`` blocks stop every process we started."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(kw_only=True)
class RunReport(ABC):
    """What a chaos or soak run found: the end-of-run verification, the run's own
    checks, its wall time, and the folder it ran in."""

    root: Path
    verification: Verification | None = None
    checks: list[Check] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def all_checks(self) -> list[Check]:
        return (self.verification.checks if self.verification else []) + self.checks

    @property
    def ok(self) -> bool:
        return self.verification is not None and all(c.ok for c in self.all_checks)

    @abstractmethod
    def table(self) -> list[tuple[str, str]]:
        """The summary rows printed before the checks."""


def add_run_options(parser: argparse.ArgumentParser, *, drain_timeout_s: float, seed: int) -> None:
    """The options every supervised run takes: ``drain_timeout_s``, ``seed``, ``dir``
    (the run folder, ``root`` of its config) and ``keep``."""
    parser.add_argument("--drain-timeout-s", type=float, default=drain_timeout_s)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--dir", type=Path, default=None, help="run folder (default: a temp one)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder")


def run_folder(root: Path | None, kind: str) -> Path:
    """``root``, or a fresh temporary folder for a ``kind`` run."""
    root = root or Path(tempfile.mkdtemp(prefix=f"forge-{kind}-"))
    log(f"{kind} run in {root}")
    return root


@dataclass
class Harness:
    """The harness's side of a run: its own Redis client and store, what it published
    and the completions it has read."""

    servers: Servers
    client: redis.Redis
    keys: Keys
    store: VectorStore
    ledger: Ledger
    reader: CompletionReader

    def drained(self, drained: bool, timeout_s: float) -> Check:
        done = self.reader.finished(self.ledger.entries)
        return Check(
            f"every entry completed within the drain timeout ({timeout_s:g} s)",
            drained,
            f"{done:,}/{len(self.ledger.entries):,} completed",
        )

    def verify(self) -> Verification:
        return verify(
            self.client, self.store, self.servers.pg_url, self.ledger, self.reader, self.keys
        )


@contextlib.contextmanager
def connected(servers: Servers) -> Iterator[Harness]:
    """Start ``servers``, then connect the harness to them (the new-data group created);
    its connections close when the block ends."""
    servers.start()
    client = connect(servers.redis_url)
    keys = Keys(prefix=PREFIX, group=GROUP)
    create_group(client, keys.new_data)
    store = open_store(servers.pg_url)
    try:
        ledger = Ledger(client, keys.new_data)
        reader = CompletionReader(client, keys.completions)
        yield Harness(servers, client, keys, store, ledger, reader)
    finally:
        store.close()
        client.close()


def print_report(kind: str, report: RunReport, *, keep: bool, notes: Sequence[str] = ()) -> int:
    """The summary, the checks and the verdict; the run's exit status."""
    print()
    print_table(report.table())
    print_checks(report.all_checks)
    for note in notes:
        print(f"  note: {note}")
    verdict = "PASS" if report.ok else "FAIL"
    kept = "" if report.ok and not keep else f" (run folder kept: {report.root})"
    print(f"{kind}: {verdict}{kept}")
    return 0 if report.ok else 1


def run_supervised(
    report: RunReport, body: Callable[[Harness, list[Workers]], None], *, keep: bool = False
) -> None:
    """Run ``body`` with dedicated servers in ``report.root`` and the harness connected
    to them, then always: stop every worker and server it started, check that no
    process of the run is left, record the wall time, and remove the folder unless the
    run failed or ``keep`` asks to keep it.

    ``body`` appends each ``Workers`` it starts to the list it is given, so cleanup
    finds them even when it fails halfway.
    """
    root = report.root
    began = time.monotonic()
    servers = Servers(root)
    started: list[Workers] = []
    try:
        with sigterm_as_exit(), connected(servers) as harness:
            body(harness, started)
    except Exception as exc:
        log(traceback.format_exc())
        report.checks.append(Check("run completed", False, f"{type(exc).__name__}: {exc}"))
    finally:
        for workers in started:
            if workers.alive:
                workers.stop(timeout_s=15)
        servers.stop()
        tracked = servers.tracked + [p for w in started for p in w.tracked]
        leaks = leaked_processes(tracked, root)
        report.checks.append(
            Check(
                "no process of the run left (psutil)",
                not leaks,
                f"{len(tracked)} tracked; left: {leaks or 'none'}",
            )
        )
        report.wall_s = time.monotonic() - began
        if report.ok and not keep:
            shutil.rmtree(root, ignore_errors=True)
