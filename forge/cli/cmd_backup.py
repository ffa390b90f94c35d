"""``forge backup`` (create, verify, restore): one backup of Redis, PostgreSQL and
MLflow, as ``forge.backup.orchestrator`` takes and restores it.

The orchestrator (and with it the Redis and PostgreSQL clients) is imported by the
commands that reach servers: ``verify`` reads files only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from forge.backup.manifest import Manifest, PartName, verify
from forge.cli.output import print_json, print_table
from forge.settings import Settings


def run_create(args: argparse.Namespace, settings: Settings) -> int:
    from forge.backup import orchestrator

    exclude: list[PartName] = list(args.exclude)
    manifest = orchestrator.create(settings, Path(args.dir), exclude)
    _report(manifest, args.json, f"backup written to {args.dir}")
    return 0


def run_verify(args: argparse.Namespace, settings: Settings) -> int:
    manifest = verify(Path(args.dir))
    _report(manifest, args.json, f"backup {args.dir}: every file matches its checksum")
    return 0


def run_restore(args: argparse.Namespace, settings: Settings) -> int:
    from forge.backup import orchestrator

    manifest = orchestrator.restore(settings, Path(args.dir), force=args.force)
    _report(
        manifest, False, f"restored {args.dir} (taken {manifest.created_at:%Y-%m-%d %H:%M:%SZ})"
    )
    return 0


def _report(manifest: Manifest, as_json: bool, headline: str) -> None:
    if as_json:
        print_json(msgspec.to_builtins(manifest))
        return
    sys.stdout.write(f"{headline}\n")
    rows = [
        [part.name, part.format, file.name, file.size_bytes, part.server_version]
        for part in manifest.parts
        for file in part.files
    ]
    print_table(["part", "format", "file", "bytes", "server"], rows)
