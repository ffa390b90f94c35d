"""Benchmark: one hyperparameter study (``tune``) on one trainer worker against two.

    .venv/bin/python bench/tuning.py [--trials 20] [--epochs 20] [--root DIR] [--keep]

Data: scikit-learn's digits (1,797 8x8 images as 64-d vectors, 10 classes) in a
collection of the run's own PostgreSQL. The request trains the ``classifier`` task
(``--epochs`` epochs, patience 5) with the task's default search space (learning
rate, hidden size, dropout, weight decay), ``--trials`` trials, seed 0.

For each worker count (1, then 2) the run starts that many ``forge worker``
processes (each limited to one torch thread: ``OMP_NUM_THREADS=1``), publishes the
tune request under a fresh model name and times it from the publish to its
completion: the whole study, the trials the other worker ran from ``forge:trials``
included, and registering the best trial. Before it, small untimed studies run until
every worker has run a trial: each worker process imports torch, MLflow and Optuna and
opens its stores on its first one, once in its life. The same run also trains the default parameters
once (a plain request) for the quality check. The machine's load average is printed
beside each timing: on a machine shared with other jobs the ratio says little.

Checks: two workers finish in at most 0.6x the single worker's time; the best
trial's validation macro-F1 is at least the default parameters'. Both need the two
workers to have two free cores: on a shared machine the ratio is what it is.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import redis
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from bench._common import connect, log
from bench._harness import open_store, print_table
from bench._servers import Servers
from bench._workers import Workers, WorkerSettings, start_workers
from forge.events import EVENT_FIELD, Completion
from forge.keys import Keys
from forge.vectorstore import Row

COLLECTION = "digits"
SPEEDUP_TARGET = 0.6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--root", type=Path, default=None, help="run folder (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder")
    args = parser.parse_args()
    with _run_folder(args.root, args.keep) as root:
        servers = Servers(root / "servers")
        started: list[Workers] = []
        try:
            servers.start()
            return _bench(servers, root, args, started)
        finally:
            for workers in started:
                workers.stop(timeout_s=60)
            servers.stop()


def _bench(servers: Servers, root: Path, args: argparse.Namespace, started: list[Workers]) -> int:
    _load_digits(servers.pg_url)
    client = connect(servers.redis_url)
    params = {"label_field": "digit", "epochs": args.epochs, "patience": 5, "seed": 0}
    settings = WorkerSettings(claim_min_idle_s=60.0, extra={"OMP_NUM_THREADS": "1"})
    results: dict[int, tuple[float, Completion]] = {}
    default: Completion | None = None
    for count in (1, 2):
        workers = start_workers(settings, servers, root / f"workers-{count}", count, started)
        if default is None:
            default, _ = _request(client, {"params": params})
            log(f"default parameters: val_macro_f1 {_f1(default):.4f}")
        _warm_up(client, count, params)
        load_before = os.getloadavg()[0]
        tune = {"trials": args.trials}
        done, wall_s = _request(client, {"params": params, "tune": tune})
        log(f"  load average (1 min) before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
        results[count] = (wall_s, done)
        best, counts = done.result["tune"]["best_value"], done.result["tune"]["trials"]
        log(f"{count} worker(s): {wall_s:.1f}s, best {best:.4f}, {counts}")
        log(f"  {_trial_times(servers.pg_url, done.result['tune']['study'])}")
        workers.stop(timeout_s=60)
        started.remove(workers)
    assert default is not None
    return _report(results, default, args)


def _report(results: dict[int, tuple[float, Completion]], default: Completion, args: Any) -> int:
    one_s, one = results[1]
    two_s, two = results[2]
    ratio = two_s / one_s
    best = max(float(one.result["tune"]["best_value"]), float(two.result["tune"]["best_value"]))
    rows = [
        ("trials per study", str(args.trials)),
        ("1 worker: study wall time", f"{one_s:.1f} s"),
        ("2 workers: study wall time", f"{two_s:.1f} s"),
        ("2 workers / 1 worker", f"{ratio:.2f}x (target <= {SPEEDUP_TARGET})"),
        ("1 worker: best val_macro_f1", f"{one.result['tune']['best_value']:.4f}"),
        ("2 workers: best val_macro_f1", f"{two.result['tune']['best_value']:.4f}"),
        ("default parameters: val_macro_f1", f"{_f1(default):.4f}"),
    ]
    print_table(rows)
    checks = {
        "two workers within the wall-time target": ratio <= SPEEDUP_TARGET,
        "best trial at least the default parameters": best >= _f1(default),
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


def _warm_up(client: redis.Redis, count: int, params: dict[str, Any]) -> None:
    """Small untimed studies until every worker has run a trial: each worker process
    imports torch, MLflow and Optuna and opens its stores on its first one, once in
    its life."""
    warmed: set[str] = set()
    for _ in range(10):
        done, _ = _request(client, {"params": {**params, "epochs": 1}, "tune": {"trials": 4}})
        warmed.add(done.worker)  # the worker that ran the study runs trials too
        warmed |= {c.worker for c in _completions(client) if "trial" in c.result}
        if len(warmed) >= count:
            return
    raise SystemExit(f"only {len(warmed)} of {count} workers ran a trial in 10 warm-up studies")


def _completions(client: redis.Redis) -> list[Completion]:
    entries = client.xrange(Keys().completions)
    return [msgspec.json.decode(e[EVENT_FIELD], type=Completion) for _, e in entries]


def _request(client: redis.Redis, fields: dict[str, Any]) -> tuple[Completion, float]:
    """Publish a classifier request over the digits; its completion and wall time."""
    keys = Keys()
    event_id = f"bench-{uuid.uuid4().hex[:12]}"
    event = {
        "type": "training-request",
        "id": event_id,
        "model": f"digits_{event_id[-12:]}",
        "task": "classifier",
        "collection": COLLECTION,
        **fields,
    }
    last = "0"
    started = time.monotonic()
    client.xadd(keys.training_requests, {EVENT_FIELD: msgspec.json.encode(event)})
    while True:
        for _, entries in client.xread({keys.completions: last}, block=1000) or []:
            for entry_id, entry in entries:
                last = entry_id
                done = msgspec.json.decode(entry[EVENT_FIELD], type=Completion)
                if done.source_id == event_id:
                    if done.status != "succeeded":
                        raise SystemExit(f"request failed: {done.error}")
                    return done, time.monotonic() - started


def _trial_times(pg_url: str, study_name: str) -> str:
    """How long trials took, and how many ran at once, from the study's own clock."""
    import optuna

    from forge.training.tuning.storage import dashboard_url

    study = optuna.load_study(study_name=study_name, storage=dashboard_url(pg_url))
    spans = [
        (t.datetime_start, t.datetime_complete)
        for t in study.trials
        if t.datetime_start is not None and t.datetime_complete is not None
    ]
    durations = [(end - start).total_seconds() for start, end in spans]
    overlap = sum(durations) / (max(e for _, e in spans) - min(s for s, _ in spans)).total_seconds()
    return (
        f"trial seconds: mean {np.mean(durations):.2f}, max {max(durations):.2f};"
        f" trials running at once on average: {overlap:.2f}"
    )


def _f1(done: Completion) -> float:
    return float(done.result["metrics"]["val_macro_f1"])


def _load_digits(pg_url: str) -> None:
    data = load_digits()
    vectors = (data.data / 16.0).astype(np.float32)
    rows = [
        Row(f"d{i}", v, "load", metadata={"digit": int(label)})
        for i, (v, label) in enumerate(zip(vectors, data.target, strict=True))
    ]
    store = open_store(pg_url)
    try:
        store.write_batch(COLLECTION, rows, ["load"], "bench:digits")
    finally:
        store.close()


@contextlib.contextmanager
def _run_folder(root: Path | None, keep: bool) -> Iterator[Path]:
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        yield root
        return
    folder = Path(tempfile.mkdtemp(prefix="forge-bench-tuning-"))
    try:
        yield folder
    finally:
        if not keep:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
