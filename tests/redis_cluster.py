"""The local Redis Cluster the tests run on (three masters; `scripts/services` starts it):
TEST_REDIS_CLUSTER_URL, any one node. Its absence is a failure, as a missing Redis is.

Redis Cluster has only database 0, shared by whoever uses these ports: every test keeps to key
prefixes of its own and deletes what it wrote (`delete_prefixed`), never FLUSHALL."""

from __future__ import annotations

import functools
import os

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

CLUSTER_URL = os.environ.get("TEST_REDIS_CLUSTER_URL", "redis://127.0.0.1:17000/0")


def cluster_is_up(url: str) -> bool:
    try:
        client = RedisCluster.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    except (redis.RedisError, RedisClusterException):
        return False
    try:
        return client.cluster_info().get("cluster_state") == "ok"
    except (redis.RedisError, RedisClusterException):
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_cluster_url() -> str:
    """The local Redis Cluster (see the module docstring)."""
    return require_cluster()


@functools.cache
def cluster_client(url: str) -> RedisCluster:
    """One synchronous client per session, to look at and clean up what a test stored."""
    return RedisCluster.from_url(url, socket_timeout=2.0)


def delete_prefixed(client: redis.Redis | RedisCluster, prefix: str) -> None:
    """Delete every key that starts with ``prefix`` (on a cluster: on every primary)."""
    for key in list(client.scan_iter(match=f"{prefix}*", count=1000)):
        client.delete(key)  # one by one: on a cluster they live in many slots


def require_cluster() -> str:
    """The cluster's URL, for tests outside tests/limits (a plain function: no conftest needed)."""
    if not cluster_is_up(CLUSTER_URL):
        pytest.fail(f"no Redis Cluster in cluster_state:ok at {CLUSTER_URL} (scripts/services starts one)")
    return CLUSTER_URL


def primary_urls(url: str) -> list[str]:
    """One URL per master of the cluster, in port order."""
    nodes = sorted(cluster_client(url).get_primaries(), key=lambda node: int(node.port))
    return [f"redis://{node.host}:{node.port}/0" for node in nodes]
