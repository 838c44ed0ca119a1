"""Limits gate each call: exact across gateway processes, per key and user, with OpenAI's headers."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
from django.core.management import call_command
from django_ratelimit.core import _get_window

from billing.models import UsageRecord
from llmgateway.models import ApiKey
from tests.gating.conftest import chat_body, fire

pytestmark = pytest.mark.django_db(transaction=True)


def statuses(responses: list[httpx.Response]) -> Counter:
    return Counter(response.status_code for response in responses)


@pytest.mark.parametrize("algorithm", ["sliding_window", "token_bucket"])
def test_a_60_rpm_key_hammered_by_200_requests_on_three_gateways_admits_exactly_its_limit(
    gateway_factory, api_key_factory, clean_redis, algorithm
) -> None:
    gateways = [gateway_factory(REDIS_URL=clean_redis, LIMITS_RPM_ALGORITHM=algorithm) for _ in range(3)]
    key = api_key_factory("hammer", rpm_limit=60)
    started = time.monotonic()
    responses = fire([g.base_url for g in gateways], key, 200)
    elapsed = time.monotonic() - started
    admitted = statuses(responses)[200]
    if algorithm == "sliding_window":
        assert statuses(responses) == {200: 60, 429: 140}  # exactly 60 in the minute
    else:
        # A bucket of 60 refilled at 1/s: 60 at once, plus what refilled while the burst lasted.
        assert 60 <= admitted <= 60 + int(elapsed) + 1
    rejected = next(r for r in responses if r.status_code == 429)
    error = rejected.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.headers["x-ratelimit-limit-requests"] == "60"
    assert rejected.headers["x-ratelimit-remaining-requests"] == "0"
    if algorithm == "token_bucket":
        # Then it refills at the set rate: one more request per second, one at a time.
        deadline = time.monotonic() + 5
        admitted_again = None
        while time.monotonic() < deadline and admitted_again is None:
            response = httpx.post(f"{gateways[0].api_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=chat_body())
            if response.status_code == 200:
                admitted_again = response
            time.sleep(0.1)
        assert admitted_again is not None
        assert admitted_again.headers["x-ratelimit-remaining-requests"] == "0"


def test_gateways_share_limits_only_under_the_same_redis_prefix(gateway_factory, api_key_factory, clean_redis) -> None:
    blue = gateway_factory(REDIS_URL=clean_redis, LIMITS_REDIS_PREFIX="blue")
    blue_again = gateway_factory(REDIS_URL=clean_redis, LIMITS_REDIS_PREFIX="blue")
    green = gateway_factory(REDIS_URL=clean_redis, LIMITS_REDIS_PREFIX="green")
    key = api_key_factory("prefixed", rpm_limit=5)
    assert statuses(fire([blue.base_url], key, 5)) == {200: 5}
    assert statuses(fire([blue_again.base_url], key, 1)) == {429: 1}
    assert statuses(fire([green.base_url], key, 5)) == {200: 5}


def test_a_noisy_key_cannot_take_another_keys_capacity(gateway, api_key_factory) -> None:
    noisy = api_key_factory("noisy", rpm_limit=5)
    quiet = api_key_factory("quiet", rpm_limit=5)
    assert statuses(fire([gateway.base_url], noisy, 30)) == {200: 5, 429: 25}
    assert statuses(fire([gateway.base_url], quiet, 5)) == {200: 5}


def test_successful_responses_carry_openai_rate_limit_headers(gateway, api_key_factory) -> None:
    key = api_key_factory("headers", rpm_limit=100, tpm_limit=10_000)
    response = httpx.post(f"{gateway.api_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=chat_body())
    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-requests"] == "100"
    assert response.headers["x-ratelimit-remaining-requests"] == "99"
    assert response.headers["x-ratelimit-limit-tokens"] == "10000"
    assert int(response.headers["x-ratelimit-remaining-tokens"]) < 10_000
    assert response.headers["x-ratelimit-reset-requests"].endswith("s")


def test_tokens_per_minute_reserve_max_tokens_and_refund_what_was_not_used(gateway, api_key_factory) -> None:
    key = api_key_factory("tpm", tpm_limit=1_000)
    body = chat_body(max_tokens=400)  # sim-fast produces 64 tokens: ~336 come back after each call
    results = [httpx.post(f"{gateway.api_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=10) for _ in range(4)]
    # Without refunds only 2 calls of ~410 reserved tokens would fit in 1,000.
    assert [r.status_code for r in results] == [200, 200, 200, 200]
    too_big = httpx.post(f"{gateway.api_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=chat_body(max_tokens=5_000))
    assert too_big.status_code == 429
    assert "Request too large" in too_big.json()["error"]["message"]


def test_concurrent_streams_per_key_are_limited_and_slots_come_back(gateway, api_key_factory) -> None:
    key = api_key_factory("streams", max_concurrent=2)
    headers = {"Authorization": f"Bearer {key}", "x-simulator-tps": "20", "x-simulator-ttft-ms": "0"}
    body = chat_body("sim-chat", stream=True, max_tokens=200)
    with httpx.Client(timeout=20) as http:
        first = http.stream("POST", f"{gateway.api_url}/chat/completions", headers=headers, json=body)
        second = http.stream("POST", f"{gateway.api_url}/chat/completions", headers=headers, json=body)
        with first as one, second as two:
            assert one.status_code == 200 and two.status_code == 200
            third = http.post(f"{gateway.api_url}/chat/completions", headers=headers, json=body)
            assert third.status_code == 429
            assert third.json()["error"]["code"] == "concurrency_limit_exceeded"
        # Both streams were closed by the client: their slots are free again.
        deadline = time.monotonic() + 5
        while True:
            with http.stream("POST", f"{gateway.api_url}/chat/completions", headers=headers, json=chat_body("sim-fast", stream=True)) as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "slots were not released"
            time.sleep(0.05)
    # Three streams reached the upstream (the two, then the one admitted again): let the gateway
    # finish recording them before the test's database is flushed.
    deadline = time.monotonic() + 5
    while UsageRecord.objects.count() < 3:
        assert time.monotonic() < deadline, "the streams were not recorded"
        time.sleep(0.02)


def test_createapikey_sets_the_keys_limits(transactional_db, capsys) -> None:
    call_command("createapikey", "erin", "--name", "ci", "--rpm", "30", "--tpm", "9000", "--max-concurrent", "3")
    raw_key = capsys.readouterr().out.strip().splitlines()[-1]
    api_key = ApiKey.objects.get(user__username="erin")
    assert raw_key.startswith(api_key.prefix)
    assert (api_key.rpm_limit, api_key.tpm_limit, api_key.max_concurrent, api_key.name) == (30, 9000, 3, "ci")


def _wait_for_a_fresh_login_window(client_ip: str, needed_seconds: float) -> None:
    """django-ratelimit counts in fixed windows (per key, jittered by a hash of the key's value):
    attempts that straddle a window's end start counting again from zero. Start early enough in
    a window that all the attempts fall inside it."""
    period = 3600  # the test's LOGIN_RATE is 10/h
    # _get_window() names the window by its last whole second: it ends one second after that.
    seconds_left = _get_window(client_ip, period) + 1 - time.time()
    if seconds_left < needed_seconds:
        time.sleep(seconds_left + 0.2)


def test_the_login_page_is_rate_limited_per_ip(gateway_factory) -> None:
    # Its own process: a fresh per-process cache. An hour's window, so that 24 slow requests on a
    # busy machine seldom straddle its end.
    gateway = gateway_factory(LOGIN_RATE="10/h")
    _wait_for_a_fresh_login_window("127.0.0.1", needed_seconds=120)
    with httpx.Client(base_url=gateway.base_url, timeout=10) as http:
        codes = []
        for attempt in range(12):
            page = http.get("/accounts/login/")
            token = http.cookies.get("csrftoken")
            response = http.post(
                "/accounts/login/",
                data={"username": f"nobody{attempt}", "password": "wrong", "csrfmiddlewaretoken": token},
                headers={"Referer": f"{gateway.base_url}/accounts/login/"},
            )
            codes.append(response.status_code)
            assert page.status_code in (200, 429)
    assert codes[:10] == [200] * 10, codes  # the form re-rendered with an error
    assert codes[10:] == [429, 429]
