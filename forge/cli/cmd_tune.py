"""``forge tune show``: a model's latest hyperparameter search, read from the study
storage in Forge's PostgreSQL (``POSTGRES_URL``, or the embedded server)."""

from __future__ import annotations

import argparse
from typing import Any

from forge.cli.output import print_json, print_table
from forge.servers.embedded_postgres import resolve_postgres_url
from forge.settings import Settings
from forge.vectorstore.naming import validate_name


def run_show(args: argparse.Namespace, settings: Settings) -> int:
    from forge.training.tuning.report import latest_study, study_report
    from forge.training.tuning.storage import open_storage

    validate_name(args.model)  # a bad name must not start a server
    url, embedded = resolve_postgres_url(settings)
    try:
        storage = open_storage(url, settings)
        try:
            report = study_report(latest_study(storage, args.model))
        finally:
            storage.remove_session()
            storage.engine.dispose()
    finally:
        if embedded is not None:
            embedded.stop()
    if args.json:
        print_json(report)
        return 0
    _print_report(report)
    return 0


def _print_report(report: dict[str, Any]) -> None:
    print(f"study        {report['study']}")
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
