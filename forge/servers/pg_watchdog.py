"""Stops the embedded PostgreSQL once the Forge process holding it dies, however it dies.

``pg_ctl start`` daemonises the server: unlike the embedded redis-server it is no child
of Forge, so a parent-death signal cannot reach it, and a SIGKILLed Forge used to leave
it running, handed to init. So every process that holds the server starts one watchdog
per data folder beside it: ``python -m forge.servers.pg_watchdog_main PGDATA PID``. The watchdog
waits for PID to exit, then does what PID's own release would have done: drop its
handle, and stop the server when no live process holds it any more
(``forge.servers.embedded_postgres.release_dead_holder``). A process that lets go of the server
normally terminates its watchdog; a joiner's death therefore never stops a server that
another process still uses.

This module starts and ends watchdogs; ``pg_watchdog_main`` is the watchdog itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_STOP_WAIT_S = 5.0


def log_path(pgdata: Path) -> Path:
    return pgdata.parent / f"{pgdata.name}-watchdog.log"


def start_watchdog(pgdata: Path) -> subprocess.Popen[bytes]:
    """A watchdog for this process's hold on the server whose data is in ``pgdata``."""
    with log_path(pgdata).open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "forge.servers.pg_watchdog_main", str(pgdata), str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # A session of its own: the Ctrl-C that asks Forge to drain must not end the
            # watchdog while Forge still holds the server.
            start_new_session=True,
            # This process's import path, so the watchdog runs the same Forge however
            # this one found it (an editable install elsewhere, pytest's rootdir).
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )


def stop_watchdog(watchdog: subprocess.Popen[bytes]) -> int | None:
    """End a watchdog whose process let go of the server normally.

    Returns the status it had already exited with, if it had (it should not have: it
    only exits once its parent is gone), else None.
    """
    exited = watchdog.poll()
    if exited is None:
        watchdog.terminate()  # SIGTERM's default action: it holds nothing to clean up
        try:
            watchdog.wait(_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()
    return exited
