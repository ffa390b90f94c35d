"""The local Redis Cluster harness (tests/support/redis_cluster.py), and the redis-py
cluster behaviour Forge's cluster mode relies on: hash-tagged keys share a slot, so a
script, a transaction or a read of several streams works on them; a restarted master
keeps its data and the client carries on; a dead master fails only its own keys."""

from __future__ import annotations

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import CrossSlotTransactionError, RedisClusterException

from tests.support.redis_cluster import LocalCluster

pytestmark = pytest.mark.slow

_MASTERS = 3


def _spread_keys(cluster: LocalCluster, prefix: str) -> dict[str, int]:
    """Keys (no hash tags) and the master each lives on, covering every master."""
    keys = {f"{prefix}key:{n}": cluster.node_for_key(f"{prefix}key:{n}") for n in range(30)}
    assert set(keys.values()) == set(range(_MASTERS)), "30 keys should reach every master"
    return keys


def test_the_cluster_is_up_and_maps_keys_to_masters(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, cluster_prefix: str
) -> None:
    assert len(redis_cluster.urls) == _MASTERS
    assert redis_cluster.url == redis_cluster.urls[0]
    assert redis_cluster.url.endswith("/0"), "db 0 is the only one a cluster client takes"
    assert {n.name for n in cluster_client.get_primaries()} == {
        f"127.0.0.1:{port}" for port in redis_cluster.ports
    }
    keys = _spread_keys(redis_cluster, cluster_prefix)
    for key in keys:
        cluster_client.set(key, key)
    for key, i in keys.items():
        # A plain client of the master the harness names holds the key (any other
        # master would answer MOVED).
        with redis_cluster.nodes[i].client() as node:
            assert node.get(key) == key
    tag = redis_cluster.hash_tag_on(2)
    assert redis_cluster.node_for_key(f"{cluster_prefix}{tag}:anything") == 2


def test_a_restarted_master_keeps_its_keys_and_the_client_carries_on(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, cluster_prefix: str
) -> None:
    keys = _spread_keys(redis_cluster, cluster_prefix)
    for key in keys:
        cluster_client.set(key, key)
    stream = f"{cluster_prefix}{redis_cluster.hash_tag_on(1)}:new-data"
    cluster_client.xgroup_create(stream, "forge", id="0", mkstream=True)
    entry_id = cluster_client.xadd(stream, {"event": "1"})

    redis_cluster.restart(1)

    # The same client: its pooled connection to master 1 is dead, and redis-py
    # reconnects within the command (a ConnectionError is retried after a refresh).
    assert cluster_client.mget_nonatomic(list(keys)) == [k.encode() for k in keys]
    assert cluster_client.xinfo_groups(stream)[0]["name"] == b"forge"
    read = cluster_client.xreadgroup("forge", "c1", {stream: ">"}, count=10)
    assert read == [[stream.encode(), [(entry_id, {b"event": b"1"})]]]
    on_one = next(k for k, i in keys.items() if i == 1)
    assert cluster_client.set(on_one, "after") is True


def test_a_dead_master_fails_only_its_own_keys(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, cluster_prefix: str
) -> None:
    keys = _spread_keys(redis_cluster, cluster_prefix)
    for key in keys:
        cluster_client.set(key, key)

    redis_cluster.kill(2)  # SIGKILL: only the fsynced append-only file is left
    redis_cluster.wait_failed(2)

    for key, i in keys.items():
        if i == 2:
            with pytest.raises(redis.ConnectionError):
                cluster_client.get(key)
        else:
            # cluster-require-full-coverage no: the other masters keep serving.
            assert cluster_client.get(key) == key.encode()
    redis_cluster.start(2)
    assert cluster_client.mget_nonatomic(list(keys)) == [k.encode() for k in keys]


def test_a_partition_hash_tag_keeps_scripts_transactions_and_reads_in_one_slot(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, cluster_prefix: str
) -> None:
    # Two partitions' tags on different masters (``{p0}`` and ``{p1}`` themselves
    # both land on the third master of a fresh three-master cluster).
    p0 = f"{cluster_prefix}{redis_cluster.hash_tag_on(0)}"
    p1 = f"{cluster_prefix}{redis_cluster.hash_tag_on(1)}"
    script = cluster_client.register_script(
        "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])"
    )
    assert script(keys=[f"{p0}:marker", f"{p0}:count"], args=["x"]) == 1
    with pytest.raises(RedisClusterException, match="same key slot"):
        script(keys=[f"{p0}:marker", f"{p1}:count"], args=["x"])

    with cluster_client.pipeline(transaction=True) as pipe:
        pipe.xadd(f"{p0}:completions", {"c": "1"}).incr(f"{p0}:count")
        assert pipe.execute()[1] == 2
    with (
        pytest.raises(CrossSlotTransactionError),
        cluster_client.pipeline(transaction=True) as pipe,
    ):
        pipe.incr(f"{p0}:count").incr(f"{p1}:count").execute()

    streams = {f"{p0}:new-data": ">", f"{p0}:training-requests": ">"}
    for stream in streams:
        cluster_client.xgroup_create(stream, "forge", id="0", mkstream=True)
        cluster_client.xadd(stream, {"event": stream})
    read = cluster_client.xreadgroup("forge", "c1", streams, count=10, block=50)
    assert sorted(name for name, _ in read) == sorted(s.encode() for s in streams)
    with pytest.raises(RedisClusterException, match="same key slot"):
        cluster_client.xreadgroup("forge", "c1", {f"{p0}:new-data": ">", f"{p1}:x": ">"})


def test_eval_reaches_a_live_master_while_another_is_down(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, cluster_prefix: str
) -> None:
    # A registered script that meets NOSCRIPT (a restarted master) loads itself on
    # every master and so fails while any one is down; EVAL goes to the key's master.
    body = "return redis.call('INCR', KEYS[1])"
    key = f"{cluster_prefix}{redis_cluster.hash_tag_on(0)}:count"
    redis_cluster.kill(1)
    with redis_cluster.nodes[0].client() as node:
        node.script_flush()  # what a restart of master 0 does to its script cache
    assert cluster_client.eval(body, 1, key) == 1
