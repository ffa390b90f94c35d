"""``forge backup``: one backup of every store Forge keeps state in, and its restore.

A backup takes Redis first, then PostgreSQL, then MLflow. Restored, Redis is then the
oldest of the three: an event settled after the Redis part was taken comes back
unacknowledged (or pending) and is delivered again, and the stores recognise it: the
embed handler's processed-event ledger in PostgreSQL, the train handler's lookup of
the version registered for its request in MLflow. The other order would lose events:
acknowledged in Redis, missing from the stores, with nothing left to redeliver them.
With the workers stopped (scaled to zero) the three parts are one moment's state.

A restore checks every file against the manifest and every target for data before it
changes anything, and refuses servers that hold data unless forced.
"""

from __future__ import annotations

import shutil
from collections.abc import Collection, Iterator
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import redis
import structlog

from forge import __version__
from forge.backup import mlflow_part, postgres_part, redis_format, redis_part
from forge.backup.manifest import (
    BackupError,
    Manifest,
    Part,
    PartName,
    describe_file,
    verify,
    write_manifest,
)
from forge.keys import Keys
from forge.servers.endpoints import open_redis
from forge.settings import Settings
from forge.settings_values import redact_url

log = structlog.get_logger(__name__)
REDIS_FILE = "redis.jsonl"


def create(settings: Settings, folder: Path, exclude: Collection[PartName] = ()) -> Manifest:
    """Write a backup of the stores not excluded into ``folder`` (new or empty)."""
    # Before anything is written: a store that cannot be backed up fails the command.
    mlflow_store = None if "mlflow" in exclude else mlflow_part.locate(settings)
    created = _claim_folder(folder)
    try:
        parts = list(_dump_parts(settings, folder, exclude, mlflow_store))
        manifest = Manifest(
            forge_version=__version__,
            created_at=datetime.now(UTC),
            stream_prefix=settings.stream_prefix,
            group=settings.group,
            parts=parts,
        )
        write_manifest(folder, manifest)
    except BaseException:
        # Half a backup is no backup: leave the folder as it was found.
        _empty(folder, remove=created)
        raise
    return manifest


def _dump_parts(
    settings: Settings,
    folder: Path,
    exclude: Collection[PartName],
    mlflow_store: mlflow_part.Store | None,
) -> Iterator[Part]:
    # In this order: see the module notes.
    if "redis" not in exclude:
        with open_redis(settings) as (client, used):
            yield _dump_redis(client, used, folder)
    if "postgres" not in exclude:
        with postgres_part.database_url(settings) as url:
            yield postgres_part.dump(settings, url, folder)
    if mlflow_store is not None:
        yield mlflow_part.dump(settings, mlflow_store, folder)


def _dump_redis(client: redis.Redis, settings: Settings, folder: Path) -> Part:
    counts = redis_part.dump(client, Keys.from_settings(settings), folder / REDIS_FILE)
    log.info("redis part written", **asdict(counts))
    return Part(
        name="redis",
        format=f"{redis_format.FORMAT}/{redis_format.VERSION}",
        server_version=redis_part.server_version(client),
        source=redact_url(settings.redis_url) or "",
        files=[describe_file(folder, REDIS_FILE)],
    )


def restore(settings: Settings, folder: Path, *, force: bool = False) -> Manifest:
    """Restore ``folder`` into the configured (or embedded) servers, which must hold
    no data unless ``force``, in which case what they hold is replaced."""
    manifest = verify(folder)
    redis_backup = manifest.part("redis")
    if redis_backup is not None and (manifest.stream_prefix, manifest.group) != (
        settings.stream_prefix,
        settings.group,
    ):
        raise BackupError(
            f"the backup is of stream prefix {manifest.stream_prefix!r} and group"
            f" {manifest.group!r}: set FORGE_STREAM_PREFIX and FORGE_GROUP to match"
        )
    with _Targets(settings, manifest) as targets:
        held = targets.contents()
        if held and not force:
            raise BackupError(
                f"refusing to restore into servers that hold data: {'; '.join(held)}"
                " (--force replaces it)"
            )
        if force:
            targets.require_no_workers()
            targets.clear()
        targets.restore(folder)
    return manifest


class _Targets:
    """The servers a restore writes to, opened (embedded ones started) for its length."""

    def __init__(self, settings: Settings, manifest: Manifest) -> None:
        self.settings = settings
        self.manifest = manifest
        self.keys = Keys.from_settings(settings)
        self.redis: redis.Redis | None = None
        self.postgres_url: str | None = None
        self.mlflow: mlflow_part.Store | None = None
        self._stack = ExitStack()

    def __enter__(self) -> _Targets:
        with self._stack as stack:
            if self.manifest.part("mlflow") is not None:
                self.mlflow = mlflow_part.locate(self.settings)
            if self.manifest.part("redis") is not None:
                self.redis, _ = stack.enter_context(open_redis(self.settings))
            if self.manifest.part("postgres") is not None:
                self.postgres_url = stack.enter_context(postgres_part.database_url(self.settings))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def contents(self) -> list[str]:
        found: list[str | None] = []
        if self.redis is not None and not redis_part.is_empty(self.redis, self.keys):
            found.append(f"Redis has keys under the prefix {self.keys.prefix!r}")
        if self.postgres_url is not None:
            found.append(postgres_part.contents(self.postgres_url))
        if self.mlflow is not None:
            found.append(mlflow_part.contents(self.mlflow))
        return [item for item in found if item]

    def require_no_workers(self) -> None:
        """A worker writing while its stores are replaced would mix the two states."""
        if self.redis is None:
            return
        within_s = self.settings.claim_min_idle_s
        active = redis_part.active_consumers(self.redis, self.keys, within_s)
        if active:
            raise BackupError(
                f"workers seem to be running ({', '.join(active[:3])} read within"
                f" {within_s:g}s): stop them, and wait FORGE_CLAIM_MIN_IDLE_S, before --force"
            )

    def clear(self) -> None:
        if self.redis is not None:
            redis_part.wipe(self.redis, self.keys)
        if self.postgres_url is not None:
            postgres_part.clear(self.postgres_url)

    def restore(self, folder: Path) -> None:
        # Redis last: a worker that finds its streams back finds its stores back too.
        if self.postgres_url is not None:
            part = _required(self.manifest, "postgres")
            postgres_part.restore(self.settings, self.postgres_url, folder, part)
        if self.mlflow is not None:
            mlflow_part.restore(
                self.settings, self.mlflow, folder, _required(self.manifest, "mlflow")
            )
        if self.redis is not None:
            counts = redis_part.restore(self.redis, self.keys, folder / REDIS_FILE)
            # Expired: keys whose expiry passed since the backup, left out as Redis would have.
            log.info("redis part restored", **asdict(counts))


def _required(manifest: Manifest, name: PartName) -> Part:
    part = manifest.part(name)
    assert part is not None  # targets are opened only for the parts present
    return part


def _claim_folder(folder: Path) -> bool:
    """Make sure ``folder`` is an empty folder; whether it had to be created."""
    if folder.exists() and not folder.is_dir():
        raise BackupError(f"{folder} is a file: a backup goes into a new or empty folder")
    if folder.exists() and any(folder.iterdir()):
        raise BackupError(f"{folder} is not empty: a backup goes into a new or empty folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _empty(folder: Path, *, remove: bool) -> None:
    if remove:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in folder.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
