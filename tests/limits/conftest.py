"""Fixtures for the limiter tests: a backend harness run against Redis, a Redis Cluster and
in-process, unique key prefixes with cleanup, and private redis-server processes
(`testbed.services.RedisServer`) to kill, pause and restart.

The Redis Cluster is the local one `scripts/services` starts (see `tests.redis_cluster`)."""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import redis
import redis.asyncio as aioredis
from redis.cluster import RedisCluster

from infra.redis import ClusterClient
from limits import (
    Decision,
    InProcessLimiter,
    Limiter,
    LimitKind,
    LimitSpec,
    ManualClock,
    RedisLimiter,
)
from testbed.services import RedisServer
from tests.redis_cluster import CLUSTER_URL, cluster_client, redis_cluster_url
from tests.redis_cluster import delete_prefixed as delete_keys

__all__ = ["redis_cluster_url"]  # a fixture of these tests too

REDIS_URL = os.environ.get("LIMITS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def is_cluster(url: str) -> bool:
    return url == CLUSTER_URL


def sync_client(url: str) -> redis.Redis | RedisCluster:
    """A client to look at what the limiter stored, on a single Redis or the cluster."""
    if is_cluster(url):
        return RedisCluster.from_url(url, socket_timeout=2.0)
    return redis.Redis.from_url(url)


def async_client(url: str) -> aioredis.Redis | aioredis.RedisCluster:
    if is_cluster(url):
        return ClusterClient.from_url(url)
    return aioredis.Redis.from_url(url)


@functools.cache
def _cleaner(url: str) -> redis.Redis | RedisCluster:
    return cluster_client(url) if is_cluster(url) else redis.Redis.from_url(url)


def delete_prefixed(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (on a cluster: on every primary)."""
    delete_keys(_cleaner(url), f"{prefix}:")


def _redis_is_up(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def single_redis_url() -> str:
    """The shared Redis (scripts/test starts it); its absence is a failure, not a skip."""
    if not _redis_is_up(REDIS_URL):
        pytest.fail(f"no Redis at {REDIS_URL}: start it (scripts/services) before the tests")
    return REDIS_URL


@pytest.fixture(params=["redis", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """The shared Redis, then the local Redis Cluster: the tests that take it run on both."""
    return str(request.getfixturevalue("single_redis_url" if request.param == "redis" else "redis_cluster_url"))


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix unique to this test; every key under it is deleted afterwards."""
    value = f"test:limits:{uuid.uuid4().hex[:12]}"
    yield value
    delete_prefixed(redis_url, value)


@dataclass
class Backend:
    """One limiter plus the clock that drives it, as the shared suite sees it."""

    name: str
    limiter: Limiter
    clock: ManualClock
    group: str = field(default_factory=lambda: f"g{uuid.uuid4().hex[:8]}")

    def spec(
        self,
        key: str,
        *,
        kind: LimitKind = "token_bucket",
        limit: int = 5,
        period: float = 50.0,
        cost: int = 1,
    ) -> LimitSpec:
        return LimitSpec(key=key, kind=kind, limit=limit, period_seconds=period, cost=cost)

    async def acquire(self, *specs: LimitSpec, group: str | None = None) -> Decision:
        return await self.limiter.acquire(specs, group=group or self.group)

    async def remaining(self, spec: LimitSpec) -> int:
        """Peek (cost 0) at what the spec could still take."""
        peek = LimitSpec(spec.key, spec.kind, spec.limit, spec.period_seconds, cost=0)
        decision = await self.limiter.acquire([peek], group=self.group)
        return decision.states[0].remaining


@pytest.fixture(params=["redis", "cluster", "inprocess"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """The limiter under test, on a `ManualClock` (the Redis scripts take it instead of TIME)."""
    clock = ManualClock()
    url = prefix = ""
    if request.param == "inprocess":
        limiter: Limiter = InProcessLimiter(clock=clock)
    else:
        url = request.getfixturevalue(
            "single_redis_url" if request.param == "redis" else "redis_cluster_url"
        )
        prefix = f"test:limits:{uuid.uuid4().hex[:12]}"
        # a generous timeout: these tests specify semantics, not latency
        limiter = RedisLimiter(
            async_client(url), prefix=prefix, timeout=10.0, clock=clock, owns_client=True
        )
    yield Backend(request.param, limiter, clock)
    await limiter.aclose()
    if url:
        delete_prefixed(url, prefix)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free port, killed after the test."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: the failure-policy tests need a server to stop")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()
