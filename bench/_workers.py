"""``forge worker`` subprocesses of a run: spawned, SIGKILLed, replaced and drained by hand,
as a supervisor would."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil  # type: ignore[import-untyped]
import redis

from bench._common import GROUP, PREFIX, REPO, consumer_pid, log
from bench._servers import Servers
from forge.servers.proc import die_with_parent_preexec

MAX_UNEXPECTED_EXITS = 20  # replacing workers that die on their own, but not forever


@dataclass
class WorkerSettings:
    """The environment every ``forge worker`` of a run gets (see forge/settings.py)."""

    claim_min_idle_s: float = 5.0
    reclaim_interval_s: float = 1.0
    read_block_s: float = 0.5
    max_batch_size: int = 32
    embed_pipeline_depth: int = 8
    stream_maxlen: int = 1_000_000
    log_level: str = "INFO"  # wait_serving() looks for the INFO line "worker started"
    extra: dict[str, str] = field(default_factory=dict)

    def env(self, servers: Servers, home: Path) -> dict[str, str]:
        env = dict(os.environ)
        for name in list(env):
            if name.startswith("FORGE_") or name in {"REDIS_URL", "POSTGRES_URL", "MAX_BATCH_SIZE"}:
                del env[name]  # the run's settings only, whatever the calling shell set
        env.update(
            REDIS_URL=servers.redis_url,
            POSTGRES_URL=servers.pg_url,
            FORGE_STREAM_PREFIX=PREFIX,
            FORGE_GROUP=GROUP,
            FORGE_HOME=str(home),
            FORGE_CLAIM_MIN_IDLE_S=str(self.claim_min_idle_s),
            FORGE_RECLAIM_INTERVAL_S=str(self.reclaim_interval_s),
            FORGE_READ_BLOCK_S=str(self.read_block_s),
            MAX_BATCH_SIZE=str(self.max_batch_size),
            FORGE_EMBED_PIPELINE_DEPTH=str(self.embed_pipeline_depth),
            # Completions and dead letters must all stay readable for the checks.
            FORGE_STREAM_MAXLEN=str(self.stream_maxlen),
            FORGE_HTTP_HOST="127.0.0.1",
            FORGE_LOG_FORMAT="json",
            FORGE_LOG_LEVEL=self.log_level,
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra)
        return env


@dataclass
class WorkerProc:
    popen: subprocess.Popen[bytes]
    process: psutil.Process
    log_path: Path
    started_at: float


class Workers:
    """``forge worker`` subprocesses, one worker each; what a supervisor would do, by hand."""

    def __init__(self, env: dict[str, str], log_dir: Path, consumers: str) -> None:
        self.env = env
        self.log_dir = log_dir
        self.consumers = consumers
        self.alive: list[WorkerProc] = []
        self.tracked: list[psutil.Process] = []
        self.kills = 0
        self.replacements = 0
        self.startup_failures: list[str] = []  # died before serving (Redis down, say)
        self.crashes: list[str] = []  # died on their own while serving: a real problem
        self.exit_codes: list[int] = []
        self._count = 0

    def spawn(self) -> WorkerProc:
        self._count += 1
        log_path = self.log_dir / f"worker-{self._count:03d}.log"
        cmd = [sys.executable, "-m", "forge.cli.main", "worker", "--http-port", "0"]
        cmd += ["--consumers", self.consumers]
        with log_path.open("wb") as out:
            popen = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # SIGTERM (a graceful drain) if the harness dies: an interrupted run
                # leaves no worker behind. Safe in preexec_fn: no threads fork here.
                preexec_fn=die_with_parent_preexec(signal.SIGTERM),  # noqa: PLW1509
            )
        proc = WorkerProc(popen, psutil.Process(popen.pid), log_path, time.monotonic())
        self.alive.append(proc)
        self.tracked.append(proc.process)
        return proc

    def kill_random(
        self,
        rng: random.Random,
        holders: Callable[[], tuple[set[int], set[int]]] | None = None,
        wait_s: float = 2.0,
    ) -> int | None:
        """SIGKILL one worker (no drain, no ack: the crash the runtime must survive)
        and start its replacement; returns the victim's pid, or None if none may die.

        ``holders`` returns the pids of workers holding unacked entries, and of those
        holding an entry a third death would dead-letter. A victim caught mid-batch is
        preferred (waiting up to ``wait_s`` for one: killing an idle worker proves
        little); the second kind is spared, because three deliveries to workers that
        all die is the poison-pill rule (dead-lettered by design), not a loss.
        """
        candidates = list(self.alive)
        deadline = time.monotonic() + wait_s
        while holders is not None:
            busy, spared = holders()
            candidates = [p for p in self.alive if p.popen.pid not in spared]
            caught = [p for p in candidates if p.popen.pid in busy]
            if caught:
                candidates = caught
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        if not candidates:
            return None
        victim = rng.choice(candidates)
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait()
        self.alive.remove(victim)
        self.kills += 1
        self.spawn()
        self.replacements += 1
        return victim.popen.pid

    def reap(self) -> None:
        """Replace workers that exited on their own, noting why."""
        for proc in list(self.alive):
            code = proc.popen.poll()
            if code is None:
                continue
            self.alive.remove(proc)
            tail = _tail(proc.log_path)
            note = f"pid {proc.popen.pid} exited {code}: {tail}"
            served = _serving(proc.log_path)
            (self.crashes if served else self.startup_failures).append(note)
            log(f"worker {'crashed' if served else 'failed to start'}: {note}")
            if len(self.crashes) + len(self.startup_failures) > MAX_UNEXPECTED_EXITS:
                raise RuntimeError(f"workers keep dying; see {self.log_dir}")
            self.spawn()
            self.replacements += 1

    def wait_serving(self, timeout_s: float) -> None:
        """Until every worker has logged that its loop runs (imports, model registry and
        Redis connection done); a consumer only shows in XINFO once it has read."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.reap()
            if all(_serving(p.log_path) for p in self.alive):
                return
            time.sleep(0.2)
        raise TimeoutError(f"workers not serving within {timeout_s}s; see {self.log_dir}")

    def stop(self, timeout_s: float) -> list[int]:
        """SIGTERM all (each drains its batch and exits 0), SIGKILL stragglers."""
        for proc in self.alive:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.alive:
            try:
                code = proc.popen.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                code = proc.popen.wait()
            self.exit_codes.append(code)
        self.alive.clear()
        return list(self.exit_codes)

    def pids(self) -> list[int]:
        return [p.popen.pid for p in self.alive]

    def log_events(self) -> Counter[str]:
        """How often each log event occurred, over every worker of the run (JSON logs)."""
        counts: Counter[str] = Counter()
        for path in sorted(self.log_dir.glob("worker-*.log")):
            for line in path.read_bytes().splitlines():
                with contextlib.suppress(ValueError, TypeError, KeyError):  # not JSON
                    counts[str(msgspec.json.decode(line)["event"])] += 1
        return counts


def start_workers(
    settings: WorkerSettings, servers: Servers, root: Path, count: int, started: list[Workers]
) -> Workers:
    """``count`` ``forge worker`` processes with the real handlers (``consumers:register``),
    logging under ``root/logs``, all serving when this returns. ``started`` gets them
    at once, so the run's cleanup stops them even if one never comes up."""
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = Workers(settings.env(servers, root / "home"), log_dir, "consumers:register")
    started.append(workers)
    for _ in range(count):
        workers.spawn()
    workers.wait_serving(timeout_s=180)
    return workers


def _serving(log_path: Path) -> bool:
    try:
        return b'"worker started"' in log_path.read_bytes()
    except OSError:
        return False


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_bytes()[-4000:].decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


def holders(client: redis.Redis, stream: str, max_deliveries: int) -> tuple[set[int], set[int]]:
    """Pids of the consumers holding unacknowledged entries of ``stream`` right now, and
    of those holding an entry already delivered ``max_deliveries`` times (the next
    delivery dead-letters it). Consumer names are ``host-pid-suffix`` (forge/runtime/context.py)."""
    busy: set[int] = set()
    spared: set[int] = set()
    consumers: Any = client.xinfo_consumers(stream, GROUP)
    for consumer in consumers:
        pending = int(consumer["pending"])
        if pending == 0:
            continue
        name = consumer["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        try:
            pid = consumer_pid(name)
        except (ValueError, IndexError):
            continue
        held: Any = client.xpending_range(stream, GROUP, "-", "+", pending, consumername=name)
        last = any(int(e["times_delivered"]) >= max_deliveries for e in held)
        (spared if last else busy).add(pid)
    return busy, spared


def rss_bytes(pids: Sequence[int]) -> dict[int, int]:
    sizes = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            sizes[pid] = int(psutil.Process(pid).memory_info().rss)
    return sizes
