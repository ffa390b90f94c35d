"""A backup's manifest: what it holds, made by which Forge and servers, and the size
and SHA-256 of every file, so that ``forge backup verify`` and ``restore`` can tell a
complete backup from a damaged one.

The manifest is written last: a folder without ``manifest.json`` is a backup that did
not finish.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from pathlib import Path
from typing import Literal

import msgspec

from forge.errors import ForgeError

MANIFEST_FILE = "manifest.json"
FORMAT: Literal["forge-backup"] = "forge-backup"
# Bumped when a restore of this version could not read what a newer one writes.
FORMAT_VERSION = 1
_CHUNK_BYTES = 1 << 20

PartName = Literal["redis", "postgres", "mlflow"]
PART_NAMES: tuple[PartName, ...] = ("redis", "postgres", "mlflow")


class BackupError(ForgeError):
    """A backup folder that cannot be written, read, verified or restored."""


class PartFile(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    size_bytes: int
    sha256: str


class Part(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One store's share of a backup.

    ``format`` names how its files are written (``redis-jsonl/1``, ``pg_dump-custom``,
    ``sqlite+tar``); ``server_version`` what it was taken from; ``source`` the store's
    location in a form safe to print (passwords removed); ``artifact_root`` the URI
    an MLflow store's artifact locations start with, so a restore elsewhere can move
    them."""

    name: PartName
    format: str
    server_version: str
    source: str
    files: list[PartFile]
    artifact_root: str | None = None


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    format: Literal["forge-backup"] = FORMAT
    format_version: int = FORMAT_VERSION
    forge_version: str
    created_at: datetime
    stream_prefix: str
    group: str
    parts: list[Part]

    def part(self, name: PartName) -> Part | None:
        return next((p for p in self.parts if p.name == name), None)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(folder: Path, name: str) -> PartFile:
    path = folder / name
    return PartFile(name=name, size_bytes=path.stat().st_size, sha256=sha256_of(path))


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write the manifest whole or not at all (a rename over a staged file)."""
    staged = folder / f".{MANIFEST_FILE}.tmp"
    staged.write_bytes(msgspec.json.format(msgspec.json.encode(manifest)) + b"\n")
    with staged.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(staged, folder / MANIFEST_FILE)


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BackupError(f"{folder} is not a complete backup: it has no {MANIFEST_FILE}") from None
    try:
        manifest = msgspec.json.decode(raw, type=Manifest)
    except msgspec.DecodeError as exc:
        raise BackupError(f"{path} is not a Forge backup manifest: {exc}") from None
    if manifest.format_version > FORMAT_VERSION:
        raise BackupError(
            f"{path} has backup format {manifest.format_version}; this Forge reads"
            f" up to {FORMAT_VERSION}: restore with Forge {manifest.forge_version} or newer"
        )
    return manifest


def verify(folder: Path) -> Manifest:
    """The manifest, once every file it lists has its recorded size and checksum."""
    manifest = read_manifest(folder)
    for part in manifest.parts:
        for item in part.files:
            _check_file(folder, item)
    return manifest


def _check_file(folder: Path, item: PartFile) -> None:
    path = folder / item.name
    if path.parent != folder:
        raise BackupError(f"the manifest names a file outside the backup: {item.name!r}")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BackupError(f"{path} is missing") from None
    if size != item.size_bytes:
        raise BackupError(f"{path} has {size} bytes, the manifest says {item.size_bytes}")
    if sha256_of(path) != item.sha256:
        raise BackupError(f"{path} does not match its SHA-256 checksum in the manifest")
