"""The watchdog process of ``pg_watchdog``: ``python -m forge.servers.pg_watchdog_main
PGDATA PID`` waits for PID to exit, then releases PID's hold on the embedded server.

It imports only the standard library until the parent has died, so a watchdog costs a
few megabytes while it waits.
"""

from __future__ import annotations

import sys
from pathlib import Path

from forge.servers.proc import wait_for_parent_exit


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m forge.servers.pg_watchdog_main PGDATA PARENT_PID", file=sys.stderr)
        return 2
    pgdata, parent_pid = Path(args[0]), int(args[1])
    wait_for_parent_exit(parent_pid)
    from forge.servers.embedded_postgres import release_dead_holder

    release_dead_holder(pgdata, parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
