"""The limiter on a real Redis Cluster (three masters, `scripts/services`): keys of groups that
live on different nodes are decided exactly, by the cluster, never by the in-process fallback."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.cluster import RedisCluster, key_slot
from redis.exceptions import MovedError

from limits import (
    CircuitBreaker,
    InProcessLimiter,
    LimiterBackendError,
    LimiterCommandError,
    LimitSpec,
    RedisLimiter,
    ResilientLimiter,
)

from .conftest import delete_prefixed

GROUPS = 12
WORKERS = 2  # limiters with their own clients, as two gateway processes
CALLS_PER_WORKER = 50  # per group: 100 calls at a 60-per-minute key


def _node_of(client: RedisCluster, group: str) -> str:
    return client.nodes_manager.get_node_from_slot(key_slot(f"{{{group}}}".encode())).name


@pytest.fixture
def cluster_prefix(redis_cluster_url: str) -> AsyncIterator[str]:
    value = f"test:limits:{uuid.uuid4().hex[:12]}"
    yield value
    delete_prefixed(redis_cluster_url, value)


@pytest.fixture
def spread_groups(redis_cluster_url: str) -> list[str]:
    """GROUPS groups whose keys live on every master of the cluster, in turn."""
    client = RedisCluster.from_url(redis_cluster_url)
    try:
        primaries = sorted(node.name for node in client.get_primaries())
        by_node: dict[str, list[str]] = {name: [] for name in primaries}
        while min(len(groups) for groups in by_node.values()) < GROUPS // len(primaries):
            group = f"user:{uuid.uuid4().hex[:8]}"
            by_node[_node_of(client, group)].append(group)
    finally:
        client.close()
    assert len(primaries) >= 3
    return [groups[i] for i in range(GROUPS // len(primaries)) for groups in by_node.values()]


async def test_keys_on_every_node_admit_exactly_their_limit_with_no_fallback(
    redis_cluster_url: str, cluster_prefix: str, spread_groups: list[str]
) -> None:
    fallbacks: list[tuple[str, str]] = []
    limiters = [
        ResilientLimiter(
            RedisLimiter.from_url(redis_cluster_url, prefix=cluster_prefix, timeout=5.0, cluster=True),
            InProcessLimiter(),
            fail_open=True,
            breaker=CircuitBreaker(failure_threshold=5, reset_timeout=60.0),
            on_fallback=lambda operation, reason: fallbacks.append((operation, reason)),
        )
        for _ in range(WORKERS)
    ]
    rpm = LimitSpec("key:1:rpm", "token_bucket", limit=60, period_seconds=60.0)
    window = LimitSpec("key:1:rpw", "sliding_window", limit=60, period_seconds=60.0)

    async def one(limiter: ResilientLimiter, group: str) -> bool:
        return (await limiter.acquire([rpm, window], group=group)).allowed

    try:
        async with asyncio.timeout(30):
            outcomes = await asyncio.gather(
                *(
                    one(limiter, group)
                    for _ in range(CALLS_PER_WORKER)
                    for limiter in limiters
                    for group in spread_groups
                )
            )
        states = [(await limiter.health())["state"] for limiter in limiters]
    finally:
        for limiter in limiters:
            await limiter.aclose()

    per_group = len(spread_groups)
    admitted = {group: sum(outcomes[i :: per_group]) for i, group in enumerate(spread_groups)}
    assert admitted == {group: 60 for group in spread_groups}  # of 100 each, on every node
    assert fallbacks == []
    assert states == ["ok"] * WORKERS


async def test_a_plain_client_on_one_node_fails_for_keys_of_the_others(
    redis_cluster_url: str, cluster_prefix: str, spread_groups: list[str]
) -> None:
    """What REDIS_CLUSTER fixes: without it, groups owned by another node get MOVED."""
    plain = RedisLimiter.from_url(redis_cluster_url, prefix=cluster_prefix, timeout=5.0)
    spec = LimitSpec("rpm", "token_bucket", limit=60, period_seconds=60.0)
    outcomes: list[str] = []
    try:
        for group in spread_groups[:3]:  # one per node
            try:
                await plain.acquire([spec], group=group)
                outcomes.append("ok")
            except (LimiterCommandError, LimiterBackendError) as error:
                assert isinstance(error.__cause__, MovedError)
                outcomes.append("moved")
    finally:
        await plain.aclose()

    assert sorted(outcomes) == ["moved", "moved", "ok"]


async def test_scripts_are_loaded_again_on_a_node_that_forgot_them(
    redis_cluster_url: str, cluster_prefix: str, spread_groups: list[str]
) -> None:
    limiter = RedisLimiter.from_url(redis_cluster_url, prefix=cluster_prefix, timeout=5.0, cluster=True)
    spec = LimitSpec("rpm", "token_bucket", limit=3, period_seconds=60.0)
    group = spread_groups[0]
    inspector = RedisCluster.from_url(redis_cluster_url)
    try:
        assert (await limiter.acquire([spec], group=group)).allowed
        owner = inspector.nodes_manager.get_node_from_slot(key_slot(f"{{{group}}}".encode()))
        assert owner.redis_connection is not None
        owner.redis_connection.script_flush()  # others' scripts there come back the same way

        decision = await limiter.acquire([spec], group=group)
    finally:
        inspector.close()
        await limiter.aclose()

    assert decision.allowed
    assert decision.states[0].remaining == 1
