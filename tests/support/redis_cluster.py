"""A real Redis Cluster on loopback for tests: ``redis-server`` masters started by the
test, joined with ``redis-cli --cluster create``, torn down with nothing left behind.

Each master keeps an append-only file fsynced on every write, so a restart (or a
SIGKILL) of one loses nothing it acknowledged. The node timeout is short so that the
other masters notice a dead one within a second, and ``cluster-require-full-coverage
no`` keeps the slots of the live masters serving while one is down (there are no
replicas: nobody takes over a dead master's slots).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from tests.support.redis_cluster_node import (
    HOST,
    ClusterError,
    MasterProcess,
    NodeExited,
    find_binaries,
    free_port,
    wait_until,
)

__all__ = ["ClusterError", "LocalCluster", "find_binaries"]

_START_ATTEMPTS = 3
_TAG_SEARCH_LIMIT = 100_000


class LocalCluster:
    """``masters`` redis-server masters with no replicas, on free loopback ports.

    Use as a context manager, or call ``start_cluster()`` and ``stop()``. The masters'
    folders live in a new temporary folder (inside ``base_dir`` if given) that
    ``stop()`` removes. Master ``i`` keeps its port and folder (and so its
    ``nodes.conf`` and AOF) across ``restart(i)`` and ``kill(i)`` + ``start(i)``.
    """

    def __init__(
        self,
        masters: int = 3,
        *,
        node_timeout_ms: int = 500,
        timeout_s: float = 60.0,
        base_dir: Path | None = None,
        password: str | None = None,
        durable: bool = True,
    ) -> None:
        binaries = find_binaries()
        if binaries is None:
            raise ClusterError("no redis-server and redis-cli binaries found")
        self.server, self.cli = binaries
        self.masters, self.node_timeout_ms, self.timeout_s = masters, node_timeout_ms, timeout_s
        self._base_dir = base_dir
        self.password = password
        self.durable = durable
        self._own_dir: Path | None = None
        self.nodes: list[MasterProcess] = []

    def __enter__(self) -> LocalCluster:
        self.start_cluster()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- lifecycle

    def start_cluster(self) -> None:
        """Start every master, join them into one cluster, wait until it is healthy."""
        assert not self.nodes, "already started"
        try:
            self._own_dir = Path(tempfile.mkdtemp(prefix="forge-cluster-", dir=self._base_dir))
            for i in range(self.masters):
                self.nodes.append(self._start_new_node(self._own_dir / f"node{i}"))
            self._create()
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def _start_new_node(self, data_dir: Path) -> MasterProcess:
        """A master on a free port; another port if someone took this one meanwhile."""
        for attempt in range(_START_ATTEMPTS):
            node = MasterProcess(
                self.server,
                free_port(),
                data_dir,
                self.node_timeout_ms,
                self.password,
                durable=self.durable,
            )
            try:
                node.start(self.timeout_s)
            except NodeExited:
                if attempt + 1 == _START_ATTEMPTS:
                    raise
                shutil.rmtree(data_dir, ignore_errors=True)
                continue
            return node
        raise AssertionError("unreachable")

    def _create(self) -> None:
        if self.masters < 3:  # redis-cli --cluster create wants three masters at least
            self._create_small()
            return
        argv = [str(self.cli), "--cluster", "create"]
        argv += [f"{HOST}:{node.port}" for node in self.nodes]
        argv += ["--cluster-replicas", "0", "--cluster-yes"]
        # The password through the environment: ``-a`` would print a warning.
        env = {**os.environ, "REDISCLI_AUTH": self.password} if self.password else None
        result = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=self.timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")

    def _create_small(self) -> None:
        """One or two masters: each takes an equal range of the slots itself, and the
        others meet the first."""
        for i, node in enumerate(self.nodes):
            client: Any = node.client()
            low = i * 16384 // self.masters
            high = (i + 1) * 16384 // self.masters
            client.execute_command("CLUSTER", "ADDSLOTS", *range(low, high))
            if i:
                client.execute_command("CLUSTER", "MEET", HOST, str(self.nodes[0].port))
            client.close()

    def stop(self) -> None:
        """Kill every master and remove the folders this cluster created."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop(kill=True)
        self.nodes = []
        if self._own_dir is not None:
            # Only the folder this cluster made, also inside a given base_dir.
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def restart(self, i: int, *, timeout_s: float | None = None) -> None:
        """Stop master ``i`` gracefully, start it again, wait until the cluster is ok."""
        self.nodes[i].stop()
        self.start(i, timeout_s=timeout_s)

    def kill(self, i: int) -> None:
        """SIGKILL master ``i``; ``start(i)`` brings it back."""
        self.nodes[i].stop(kill=True)

    def start(self, i: int, *, timeout_s: float | None = None) -> None:
        """Start master ``i`` again (same port, folder, nodes.conf) and wait until the
        whole cluster is ok."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        self.nodes[i].start(timeout)
        self.wait_ok(timeout_s=timeout)

    def heal(self) -> None:
        """Start every master that is down and wait until the cluster is ok: what a
        test that stopped one leaves for the next."""
        for node in self.nodes:
            if not node.running:
                node.start(self.timeout_s)
        self.wait_ok()

    # -------------------------------------------------------------- health

    def wait_ok(self, *, timeout_s: float | None = None) -> None:
        """Wait until every master runs, says ``cluster_state:ok``, sees every other one
        connected and not failing, and all agree on who serves which slots."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            wait_until("cluster ok on every node", self._not_ok, timeout)
        except ClusterError as exc:
            raise ClusterError(f"{exc}\n{self.log_tails()}") from None

    def wait_failed(self, i: int, *, timeout_s: float | None = None) -> None:
        """Wait until every other master has marked the (stopped) master ``i`` as failed."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        assert not self.nodes[i].running, "stop the node first"
        wait_until(f"node {i} marked failed", lambda: self._not_failed(i), timeout)

    def _not_ok(self) -> str | None:
        layouts = set()
        for i, node in enumerate(self.nodes):
            if not node.running:
                return f"node {i} is not running"
            try:
                with node.client() as client:
                    # "CLUSTER", "INFO" apart match no redis-py reply callback: the
                    # replies stay Redis's own text, the same in every redis-py.
                    info = client.execute_command("CLUSTER", "INFO")
                    table = client.execute_command("CLUSTER", "NODES")
                    slots = client.execute_command("CLUSTER", "SLOTS")
            except redis.RedisError as exc:
                return f"node {i}: {exc}"
            problem = _unhealthy(_parse_info(info), table, self.masters)
            if problem is not None:
                return f"node {i}: {problem}"
            layouts.add(_layout(slots))
        return None if len(layouts) == 1 else f"nodes disagree on slots: {layouts}"

    def _not_failed(self, i: int) -> str | None:
        for j, node in enumerate(self.nodes):
            if j == i or not node.running:
                continue
            try:
                with node.client() as client:
                    table = client.execute_command("CLUSTER", "NODES")
            except redis.RedisError as exc:
                return f"node {j}: {exc}"
            flags = _flags_of(table, self.nodes[i].port)
            if "fail" not in flags:
                return f"node {j} sees node {i} as {sorted(flags)}"
        return None

    # -------------------------------------------------------------- addresses

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def urls(self) -> list[str]:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return [f"redis://{auth}{HOST}:{port}/0" for port in self.ports]

    @property
    def url(self) -> str:
        """The first master's URL: a cluster client discovers the others from it."""
        return self.urls[0]

    def client(self, **kwargs: Any) -> RedisCluster:
        """A cluster client of this cluster; ``kwargs`` go to ``RedisCluster.from_url``."""
        return RedisCluster.from_url(self.url, **kwargs)

    def node_index_for_slot(self, slot: int) -> int:
        """Which master serves ``slot`` (as the first running master sees it)."""
        return self._owner(slot, self._slot_layout())

    def node_for_key(self, key: str | bytes) -> int:
        """Which master holds ``key`` (hash tags count, as for Redis)."""
        return self.node_index_for_slot(_slot(key))

    def hash_tag_on(self, i: int, stem: str = "t") -> str:
        """A hash tag (``{t7}``) whose keys all live on master ``i``."""
        layout = self._slot_layout()
        for n in range(_TAG_SEARCH_LIMIT):
            tag = f"{{{stem}{n}}}"
            if self._owner(_slot(tag), layout) == i:
                return tag
        raise ClusterError(f"no hash tag found for node {i}")

    def _slot_layout(self) -> frozenset[tuple[int, int, int]]:
        node = next(n for n in self.nodes if n.running)
        with node.client() as client:
            return _layout(client.execute_command("CLUSTER", "SLOTS"))

    def _owner(self, slot: int, layout: frozenset[tuple[int, int, int]]) -> int:
        for start, end, port in layout:
            if start <= slot <= end:
                return self.ports.index(port)
        raise ClusterError(f"no master serves slot {slot}")

    def log_tails(self) -> str:
        """The end of each master's log, for a failure message."""
        return "\n".join(f"--- node {i}\n{n.log_tail()}" for i, n in enumerate(self.nodes))


def _slot(key: str | bytes) -> int:
    return key_slot(key.encode() if isinstance(key, str) else key)


def _parse_info(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _unhealthy(info: dict[str, str], table: str, masters: int) -> str | None:
    if info.get("cluster_state") != "ok":
        return f"cluster_state:{info.get('cluster_state')}"
    if info.get("cluster_slots_assigned") != "16384":
        return f"{info.get('cluster_slots_assigned')} slots assigned"
    if info.get("cluster_known_nodes") != str(masters):
        return f"knows {info.get('cluster_known_nodes')} nodes"
    for line in _node_lines(table):
        fields = line.split()
        flags, link = set(fields[2].split(",")), fields[7]
        if flags & {"fail", "fail?", "handshake", "noaddr"} or link != "connected":
            return f"sees {fields[1]} as {fields[2]} {link}"
    return None


def _node_lines(table: str) -> list[str]:
    return [line for line in table.splitlines() if line.strip()]


def _flags_of(table: str, port: int) -> set[str]:
    for line in _node_lines(table):
        fields = line.split()
        if fields[1].split("@")[0].endswith(f":{port}"):
            return set(fields[2].split(","))
    return set()


def _layout(slots: list[list[object]]) -> frozenset[tuple[int, int, int]]:
    """CLUSTER SLOTS as {(first slot, last slot, master port)}."""
    return frozenset((int(str(s[0])), int(str(s[1])), _port_of(s[2])) for s in slots)


def _port_of(master: object) -> int:
    assert isinstance(master, list | tuple), master
    return int(str(master[1]))
