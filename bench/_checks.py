"""The end-of-run checks: nothing lost, doubled or left pending, every record stored once,
no process of the run left."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil  # type: ignore[import-untyped]
import psycopg
import redis

from bench._common import GROUP
from bench._workload import CompletionReader, Ledger, Planned
from forge.events import EVENT_FIELD, DeadLetter
from forge.keys import Keys
from forge.vectorstore import VectorStore

_dead_letter_decoder = msgspec.json.Decoder(DeadLetter)


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
