"""Routing policies, the deployments' breakers and the limits learned from upstreams, unit by unit
(the served gateway's behaviour is in tests/gating/test_retries_and_fallbacks.py)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import pytest
import redis

from limits import ManualClock
from streaming.catalog import Deployment, ModelRoute, ProviderSpec
from upstreams import learned as learned_module
from upstreams.health import DeploymentHealth
from upstreams.learned import LearnedLimits
from upstreams.routing import attempt_order, call_ended, call_started, running

A = ProviderSpec(name="a", kind="openai", base_url="http://a.test/v1")
B = ProviderSpec(name="b", kind="openai", base_url="http://b.test/v1")
C = ProviderSpec(name="c", kind="openai", base_url="http://c.test/v1")
UNCONFIGURED = ProviderSpec(name="keyless", kind="openai", base_url="http://d.test/v1", api_key_env="NOT_SET_ANYWHERE_API_KEY")


def model(*deployments: Deployment, routing: str = "priority") -> ModelRoute:
    return ModelRoute(id="m", owned_by="test", deployments=deployments, routing=routing)  # type: ignore[arg-type]


def firsts(route: ModelRoute, draws: int = 4000) -> Counter[str]:
    rng = random.Random(7)
    return Counter(attempt_order(route, rng=rng)[0].provider.name for _ in range(draws))


def test_priority_tries_the_lowest_number_first_and_the_rest_in_order() -> None:
    route = model(Deployment(A, "m", priority=2), Deployment(B, "m", priority=0), Deployment(C, "m", priority=1))
    assert [deployment.provider.name for deployment in attempt_order(route)] == ["b", "c", "a"]


def test_deployments_of_equal_priority_share_calls_by_weight() -> None:
    route = model(Deployment(A, "m", priority=0, weight=3), Deployment(B, "m", priority=0, weight=1), Deployment(C, "m", priority=1))
    counts = firsts(route)
    assert counts["c"] == 0
    assert 0.72 < counts["a"] / 4000 < 0.78  # 3 of 4


def test_weighted_routing_draws_the_first_by_weight_and_still_lists_every_deployment() -> None:
    route = model(Deployment(A, "m", weight=1), Deployment(B, "m", weight=1), Deployment(C, "m", weight=2), routing="weighted")
    counts = firsts(route)
    assert 0.47 < counts["c"] / 4000 < 0.53
    assert 0.22 < counts["a"] / 4000 < 0.28
    assert sorted(deployment.provider.name for deployment in attempt_order(route)) == ["a", "b", "c"]


def test_least_busy_routing_starts_with_the_deployment_running_the_fewest_calls() -> None:
    first, second = Deployment(A, "m"), Deployment(B, "m")
    route = model(first, second, routing="least_busy")
    call_started(first)
    call_started(first)
    call_started(second)
    try:
        assert attempt_order(route)[0] is second
        call_ended(first)
        call_ended(first)
        assert attempt_order(route)[0] is first
    finally:
        call_ended(second)
    assert running(first) == running(second) == 0


def test_a_deployment_whose_key_is_not_set_is_never_tried() -> None:
    route = model(Deployment(UNCONFIGURED, "m"), Deployment(A, "m", priority=1))
    assert [deployment.provider.name for deployment in attempt_order(route)] == ["a"]


def test_a_breaker_opens_after_the_failures_in_a_row_then_lets_one_probe_through(settings) -> None:
    settings.UPSTREAM_BREAKER_FAILURES = 3
    settings.UPSTREAM_BREAKER_COOLDOWN = 30
    clock = ManualClock()
    health = DeploymentHealth(clock=clock)
    for _ in range(2):
        permit = health.allow("a/m")
        assert permit is not None
        health.failed("a/m", permit)
    success = health.allow("a/m")
    assert success is not None
    health.succeeded("a/m", success)  # a success in between: the count starts again
    for _ in range(3):
        permit = health.allow("a/m")
        assert permit is not None
        health.failed("a/m", permit)
    assert health.state("a/m") == "open" and health.allow("a/m") is None
    assert health.state("b/m") == "closed"  # one breaker per deployment
    clock.advance(31)
    probe = health.allow("a/m")
    assert probe is not None and probe.trial
    assert health.allow("a/m") is None  # one probe at a time
    health.succeeded("a/m", probe)
    assert health.state("a/m") == "closed"


# --- Learned limits ---------------------------------------------------------------------------

DEPLOYMENT = Deployment(A, "m", rpm=100, tpm=10_000)


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [1_800_000_000.0]
    monkeypatch.setattr(learned_module.time, "time", lambda: now[0])
    return now


@pytest.fixture
def shared_redis() -> Iterator[str]:
    from tests.gating.conftest import TEST_REDIS_URL

    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    client.close()
    yield TEST_REDIS_URL


async def test_the_published_limit_less_the_headroom_is_where_learning_starts(clock, settings) -> None:
    settings.UPSTREAM_LIMIT_HEADROOM = 0.2
    learned = LearnedLimits("", prefix="t")
    assert learned.current(DEPLOYMENT, "rpm") == 80
    assert learned.current(Deployment(B, "m"), "rpm") is None  # nothing published, nothing learned


async def test_the_upstreams_own_limit_is_the_ceiling(clock, settings) -> None:
    settings.UPSTREAM_LIMIT_HEADROOM = 0.2
    learned = LearnedLimits("", prefix="t")
    await learned.upstream_said(DEPLOYMENT, {"x-ratelimit-limit-requests": "60", "x-ratelimit-limit-tokens": "50000"})
    assert learned.current(DEPLOYMENT, "rpm") == 60  # said lower than published: down at once
    assert learned.current(DEPLOYMENT, "tpm") == 8_000  # said higher: it starts as published, less the headroom
    clock[0] += 3600
    assert learned.current(DEPLOYMENT, "tpm") == 50_000  # and it recovers up to the upstream's own
    unpublished = Deployment(B, "m")
    await learned.upstream_said(unpublished, {"x-ratelimit-limit-requests": "500"})
    assert learned.current(unpublished, "rpm") == 400  # nothing published: the upstream's own, less the headroom


async def test_a_429_cuts_a_fifth_once_per_interval_and_the_limit_recovers_slowly(clock, settings) -> None:
    settings.UPSTREAM_LIMIT_HEADROOM = 0.2
    settings.UPSTREAM_LIMIT_CUT_INTERVAL = 2.0
    settings.UPSTREAM_LIMIT_RECOVERY = 0.05
    learned = LearnedLimits("", prefix="t")
    await learned.rate_limited(DEPLOYMENT)
    assert learned.current(DEPLOYMENT, "rpm") == 64  # 80, less a fifth
    await learned.rate_limited(DEPLOYMENT)  # the same overload, answered to many calls at once
    assert learned.current(DEPLOYMENT, "rpm") == 64
    clock[0] += 2
    await learned.rate_limited(DEPLOYMENT)
    cut = (64 + 5 * 2 / 60) * 0.8  # what it had regained in those 2 s, less a fifth
    assert learned.current(DEPLOYMENT, "rpm") == pytest.approx(cut)
    clock[0] += 60
    assert learned.current(DEPLOYMENT, "rpm") == pytest.approx(cut + 5)  # +5% of 100 a minute
    clock[0] += 3600
    assert learned.current(DEPLOYMENT, "rpm") == 100  # never past the ceiling


async def test_what_one_process_learns_every_process_keeps_to(clock, shared_redis) -> None:
    one, other = LearnedLimits(shared_redis, prefix="t"), LearnedLimits(shared_redis, prefix="t")
    try:
        await one.upstream_said(DEPLOYMENT, {"x-ratelimit-limit-requests": "50"})
        await one.rate_limited(DEPLOYMENT)
        await other.refresh(DEPLOYMENT)
        assert other.current(DEPLOYMENT, "rpm") == 40
    finally:
        await one.aclose()
        await other.aclose()


async def test_with_redis_unreachable_a_process_learns_on_its_own(clock, settings) -> None:
    settings.UPSTREAM_LIMIT_HEADROOM = 0.2
    from tests.conftest import free_port

    learned = LearnedLimits(f"redis://127.0.0.1:{free_port()}/0", prefix="t")
    try:
        await learned.rate_limited(DEPLOYMENT)
        await learned.refresh(DEPLOYMENT)
        assert learned.current(DEPLOYMENT, "rpm") == 64
    finally:
        await learned.aclose()


async def test_once_the_upstream_said_its_limit_no_minute_of_the_bucket_goes_past_it(clock, settings, monkeypatch) -> None:
    from calls import limits as call_limits

    settings.UPSTREAM_LIMIT_HEADROOM = 0.2
    learned = LearnedLimits("", prefix="t")
    monkeypatch.setattr(call_limits, "learned_limits", lambda: learned)
    deployment = Deployment(A, "m", rpm=100)
    (before,) = call_limits._upstream_specs(deployment, 1)
    # Published 100: refill 80 a minute, burst 16 on top, within the published figure.
    assert (before.limit, round(60 * before.limit / before.period_seconds)) == (16, 80)
    await learned.upstream_said(deployment, {"x-ratelimit-limit-requests": "120"})
    clock[0] += 3600  # recovered to the upstream's own 120
    (after,) = call_limits._upstream_specs(deployment, 1)
    burst, refill = after.limit, 60 * after.limit / after.period_seconds
    assert burst + refill <= 120 and refill >= 119
