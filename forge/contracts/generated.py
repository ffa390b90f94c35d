"""Writing generated files and telling which committed copies no longer match the code."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

# File name -> what generates its text.
Generators = Mapping[str, Callable[[], str]]


def write(directory: Path, files: Generators) -> list[Path]:
    """Write every file into ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, generate in files.items():
        path = directory / filename
        path.write_text(generate(), encoding="utf-8")
        written.append(path)
    return written


def stale(directory: Path, files: Generators) -> list[str]:
    """The file names in ``directory`` that are missing or differ from what the code
    generates."""
    return [
        filename
        for filename, generate in files.items()
        if not (path := directory / filename).exists()
        or path.read_text(encoding="utf-8") != generate()
    ]
