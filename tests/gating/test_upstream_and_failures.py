"""Upstream protection (wait instead of 429) and the Redis failure policy, against real processes."""

from __future__ import annotations

import json
import time
from collections import Counter

import httpx
import pytest

from tests.gating.conftest import chat_body, fire

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_burst_is_smoothed_so_the_upstream_never_sees_more_than_its_limit(gateway_factory, api_key_factory, fake_upstream, clean_redis) -> None:
    upstream_rpm = 40
    fake_upstream.rpm_limit = upstream_rpm
    fake_upstream.clear_requests()
    fake_upstream.reset_rate_limit()  # earlier tests' requests must not count in its window
    try:
        gateways = [
            gateway_factory(
                REDIS_URL=clean_redis,
                UPSTREAM_LIMITS_JSON=json.dumps({"gpt-4o-mini": {"rpm": upstream_rpm}}),
                UPSTREAM_LIMIT_HEADROOM="0.2",
                UPSTREAM_MAX_WAIT="6",
            )
            for _ in range(2)
        ]
        keys = [api_key_factory(f"tenant{i}") for i in range(10)]
        started = time.monotonic()
        responses = fire([g.base_url for g in gateways], keys, 5 * upstream_rpm, body=chat_body("gpt-4o-mini"))
        elapsed = time.monotonic() - started
    finally:
        fake_upstream.rpm_limit = None
    codes = Counter(r.status_code for r in responses)
    # Nothing went over the upstream's own limit: it never had to answer 429.
    assert fake_upstream.rejected_429 == 0
    # Refill at the published 40 less the 20% headroom (32/min), burst the headroom's share of
    # that (6), over the wait bound: about 6 + 6 * 32/60 ≈ 9.
    assert 6 <= codes[200] <= 6 + int(elapsed * 32 / 60) + 2
    assert set(codes) <= {200, 429}
    turned_away = [r for r in responses if r.status_code == 429]
    assert all(r.json()["error"]["code"] == "upstream_capacity" and r.headers["retry-after"] for r in turned_away)
    # Clients that were admitted after waiting did wait rather than fail at once.
    assert max(r.elapsed.total_seconds() for r in responses if r.status_code == 200) > 1.0


def test_an_upstream_429_holds_the_model_for_its_retry_after_in_every_process(gateway_factory, api_key_factory, fake_upstream, clean_redis) -> None:
    env = {"REDIS_URL": clean_redis, "UPSTREAM_LIMITS_JSON": json.dumps({"gpt-4o-mini": {"rpm": 6000}}), "UPSTREAM_MAX_WAIT": "5"}
    first, second = gateway_factory(**env), gateway_factory(**env)
    key = api_key_factory("holder")
    headers = {"Authorization": f"Bearer {key}"}
    fake_upstream.fault = "429"
    fake_upstream.retry_after = 2
    refused = httpx.post(f"{first.api_url}/chat/completions", headers=headers, json=chat_body("gpt-4o-mini"), timeout=10)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
    refused_at = time.monotonic()
    fake_upstream.fault = None
    fake_upstream.clear_requests()
    held = httpx.post(f"{second.api_url}/chat/completions", headers=headers, json=chat_body("gpt-4o-mini"), timeout=10)
    assert held.status_code == 200
    # The other process waited out the upstream's retry-after before calling it again.
    assert fake_upstream.requests[0].started_at - refused_at >= 1.5


def test_with_redis_gone_requests_keep_flowing_fail_open_and_limits_resume(gateway_factory, api_key_factory, private_redis) -> None:
    gateway = gateway_factory(REDIS_URL=private_redis.url, LIMITS_BREAKER_RESET="1")
    key = api_key_factory("resilient", rpm_limit=1000)
    assert Counter(r.status_code for r in fire([gateway.base_url], key, 20)) == {200: 20}
    private_redis.stop()
    started = time.monotonic()
    during = fire([gateway.base_url], key, 40)
    assert Counter(r.status_code for r in during) == {200: 40}
    assert max(r.elapsed.total_seconds() for r in during) < 1.0  # nobody hangs on Redis
    assert time.monotonic() - started < 10
    health = httpx.get(f"{gateway.base_url}/healthz").json()
    assert health["status"] == "degraded" and health["limiter"]["state"] == "degraded"
    private_redis.start()  # same port, empty
    limited = api_key_factory("limited-again", rpm_limit=3)
    deadline = time.monotonic() + 10
    while httpx.get(f"{gateway.base_url}/healthz").json()["status"] != "ok":
        assert time.monotonic() < deadline, "limiter did not recover"
        httpx.post(f"{gateway.api_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=chat_body())
        time.sleep(0.2)
    assert Counter(r.status_code for r in fire([gateway.base_url], limited, 10)) == {200: 3, 429: 7}
    import redis

    assert any(b"rpm" in k for k in redis.Redis(port=private_redis.port).keys("*"))


def test_with_redis_gone_and_fail_closed_requests_get_503_quickly(gateway_factory, api_key_factory, private_redis) -> None:
    gateway = gateway_factory(REDIS_URL=private_redis.url, LIMITS_FAIL_OPEN="false")
    key = api_key_factory("strict")
    private_redis.stop()
    responses = fire([gateway.base_url], key, 10)
    assert Counter(r.status_code for r in responses) == {503: 10}
    assert responses[0].json()["error"]["code"] == "service_unavailable"
    assert max(r.elapsed.total_seconds() for r in responses) < 1.0


def test_the_gateway_starts_without_redis_and_reports_degraded(gateway_factory, api_key_factory) -> None:
    gateway = gateway_factory(REDIS_URL="redis://127.0.0.1:1/0")
    key = api_key_factory("early")
    response = httpx.post(f"{gateway.api_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=chat_body(), timeout=10)
    assert response.status_code == 200
    assert httpx.get(f"{gateway.base_url}/healthz").json()["status"] == "degraded"
    ready = httpx.get(f"{gateway.base_url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
