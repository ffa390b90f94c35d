"""``forge docs export``: regenerate the documents made from code (AsyncAPI, configuration)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forge.contracts import asyncapi, configdoc
from forge.errors import ConfigError
from forge.settings import Settings

# File name under docs/ -> what generates it.
GENERATED: dict[str, Callable[[], str]] = {
    "asyncapi.yaml": asyncapi.render_yaml,
    "configuration.md": configdoc.render,
}


def add_docs_parser(sub: Any) -> None:
    docs = sub.add_parser("docs", help="generated documentation")
    docs_sub = docs.add_subparsers(dest="docs_command", required=True)
    export_cmd = docs_sub.add_parser("export", help="write docs/asyncapi.yaml, configuration.md")
    export_cmd.add_argument("--dir", default="docs")
    export_cmd.add_argument("--check", action="store_true", help="fail if files differ from code")
    export_cmd.set_defaults(run=run_docs_export)


def export(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, generate in GENERATED.items():
        path = directory / filename
        path.write_text(generate(), encoding="utf-8")
        written.append(path)
    return written


def drift(directory: Path) -> list[str]:
    """Generated files that are missing or differ from what the code produces."""
    stale = []
    for filename, generate in GENERATED.items():
        path = directory / filename
        if not path.exists() or path.read_text(encoding="utf-8") != generate():
            stale.append(filename)
    return stale


def run_docs_export(args: argparse.Namespace, settings: Settings) -> int:
    directory = Path(args.dir)
    if args.check:
        stale = drift(directory)
        if stale:
            raise ConfigError(f"docs out of date: {', '.join(stale)} (run 'forge docs export')")
        print("docs up to date")
        return 0
    for path in export(directory):
        print(path)
    return 0
