"""``forge docs export`` and ``forge schemas export``: regenerate the files made from
code (AsyncAPI and configuration under docs/, a JSON Schema per event under schemas/)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from forge.contracts import asyncapi, configdoc, generated
from forge.contracts.schemas import schema_files
from forge.errors import ConfigError
from forge.settings import Settings

# File name under docs/ -> what generates it.
GENERATED: dict[str, Callable[[], str]] = {
    "asyncapi.yaml": asyncapi.render_yaml,
    "configuration.md": configdoc.render,
}


def drift(directory: Path) -> list[str]:
    """Generated files that are missing or differ from what the code produces."""
    return generated.stale(directory, GENERATED)


def run_docs_export(args: argparse.Namespace, settings: Settings) -> int:
    return _export("docs", GENERATED, args)


def run_schemas_export(args: argparse.Namespace, settings: Settings) -> int:
    return _export("schemas", schema_files(), args)


def _export(command: str, files: generated.Generators, args: argparse.Namespace) -> int:
    """Write the files into ``--dir``, or with ``--check`` fail naming those that differ."""
    directory = Path(args.dir)
    if args.check:
        stale = generated.stale(directory, files)
        if stale:
            raise ConfigError(
                f"{command} out of date: {', '.join(stale)} (run 'forge {command} export')"
            )
        print(f"{command} up to date")
        return 0
    for path in generated.write(directory, files):
        print(path)
    return 0
