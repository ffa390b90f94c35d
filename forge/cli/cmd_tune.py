"""``forge tune show`` and ``forge tune stop``: a model's hyperparameter searches, in
the study storage in Forge's PostgreSQL (``POSTGRES_URL``, or the embedded server)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from forge.cli.output import print_json, print_table
from forge.servers.embedded_postgres import resolve_postgres_url
from forge.settings import Settings
from forge.vectorstore.naming import validate_name

if TYPE_CHECKING:
    from optuna.storages import RDBStorage


def run_show(args: argparse.Namespace, settings: Settings) -> int:
    from forge.training.tuning.report import latest_study, study_report

    validate_name(args.model)  # a bad name must not start a server
    with _storage(settings) as storage:
        report = study_report(latest_study(storage, args.model))
    if args.json:
        print_json(report)
        return 0
    _print_report(report)
    return 0


def run_stop(args: argparse.Namespace, settings: Settings) -> int:
    from forge.training.tuning.stop import stop_study

    validate_name(args.model)
    with _storage(settings) as storage:
        outcome = stop_study(storage, args.model, args.request_id)
    if outcome.state == "finished":
        print(f"study {outcome.study} has no trial left to run: nothing to stop")
    elif outcome.state == "already stopped":
        print(f"study {outcome.study} was already stopped (running trials: {outcome.running})")
    else:
        print(
            f"stopped study {outcome.study}: no new trial starts; running trials"
            f" ({outcome.running}) end at their next epoch once one trial completed; the"
            " request then completes with the best trial so far"
        )
    return 0


@contextmanager
def _storage(settings: Settings) -> Iterator[RDBStorage]:
    from forge.training.tuning.storage import open_storage

    url, embedded = resolve_postgres_url(settings)
    try:
        storage = open_storage(url, settings)
        try:
            yield storage
        finally:
            storage.remove_session()
            storage.engine.dispose()
    finally:
        if embedded is not None:
            embedded.stop()


def _print_report(report: dict[str, Any]) -> None:
    stopped = " (stopped)" if report["stopped"] else ""
    print(f"study        {report['study']}{stopped}")
    print(f"metric       {report['metric']} ({report['direction']})")
    best = report["best_trial"]
    if best is None:
        print("best         none: no trial completed yet")
    else:
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(report["best_params"].items()))
        print(f"best         trial {best}: {_short(report['best_value'])} ({params})")
    if report["importances"]:
        ranked = ", ".join(f"{k} {v:.2f}" for k, v in report["importances"].items())
        print(f"importance   {ranked}")
    print()
    names = sorted({k for t in report["trials"] for k in t["params"]})
    rows = [
        [
            t["number"],
            t["state"],
            _short(t["value"]),
            *(_short(t["params"].get(n)) for n in names),
            _short(t["duration_s"]),
        ]
        for t in report["trials"]
    ]
    print_table(["trial", "state", "value", *names, "seconds"], rows)


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
