"""Issue 13's load benchmark, short: the gateway learns its upstream's real limit under 5x load.

The fake upstream takes 120 requests per sliding minute and answers 429 past it, with OpenAI's
x-ratelimit-* headers; the gateway (two Granian workers sharing Redis) is told a published limit
1.5x too high, and is offered 5x what the upstream takes for 20 s. The goals are issue 13's: under
1% of client calls get a 429 that started upstream (`upstream_rate_limited`; the gateway's own
`upstream_capacity` refusals after waiting for room do not count), and the learned limit settles
within 10% of the fake's real one. The full run (10 minutes, Locust, also without headers) is
`python -m bench.upstream_limits`; this test shares its accounting.
"""

from __future__ import annotations

import asyncio
import json
import secrets

import httpx
import pytest

from bench.upstream_limits import (
    GOAL_LEARNED_ERROR,
    GOAL_UPSTREAM_429_SHARE,
    MODEL,
    UPSTREAM_429,
    LearnedSamples,
    Tally,
    error_code,
    evaluate,
)

pytestmark = pytest.mark.django_db(transaction=True)

RPM = 120  # the fake upstream's real limit
PUBLISHED_FACTOR = 1.5  # the published limit the gateway is told: wrong, too high
OFFERED_FACTOR = 5
LOAD_SECONDS = 20
# Short waits keep the test short: a call turned away for capacity has waited UPSTREAM_MAX_WAIT,
# so the last calls are answered about 3 s after the load ends.
MAX_WAIT = 3  # UPSTREAM_MAX_WAIT
RETRY_DEADLINE = 5  # UPSTREAM_RETRY_DEADLINE
MAX_TOKENS = 16


async def offer(url: str, key: str, *, per_second: float, seconds: float) -> Tally:
    """Send calls at a steady rate (open loop: no call waits for another) and tally the answers."""
    tally = Tally()
    loop = asyncio.get_running_loop()
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "In one word: is the sky blue?"}],
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    timeout = httpx.Timeout(3 * MAX_WAIT + RETRY_DEADLINE + 20)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        started = loop.time()

        async def one(index: int) -> None:
            await asyncio.sleep(max(0.0, started + index / per_second - loop.time()))
            began = loop.time()
            try:
                response = await client.post(
                    f"{url}/v1/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json=body,
                )
                status, content = response.status_code, response.content
            except httpx.HTTPError as error:
                status, content = 0, repr(error).encode()
            now = loop.time()
            code = error_code(content) if status else "no answer"
            tally.add(status, code, at=now - started, took=now - began, body=content)

        async with asyncio.TaskGroup() as group:
            for index in range(round(per_second * seconds)):
                group.create_task(one(index))
    return tally


def test_the_gateway_learns_the_upstreams_real_limit_under_5x_load(
    gateway_factory, api_key_factory, fake_upstream, clean_redis, tmp_path
) -> None:
    fake_upstream.rpm_limit = RPM
    fake_upstream.rate_limit_headers = True
    fake_upstream.tokens = MAX_TOKENS
    fake_upstream.reset_rate_limit()  # earlier tests' requests must not count in its window
    fake_upstream.clear_requests()
    token = secrets.token_hex(16)
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    gateway = gateway_factory(
        workers=2,
        REDIS_URL=clean_redis,
        METRICS_TOKEN=token,
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        UPSTREAM_LIMITS_JSON=json.dumps({MODEL: {"rpm": round(RPM * PUBLISHED_FACTOR)}}),
        UPSTREAM_LIMIT_HEADROOM="0.2",
        UPSTREAM_MAX_WAIT=str(MAX_WAIT),
        UPSTREAM_RETRY_DEADLINE=str(RETRY_DEADLINE),
        GATEWAY_FIRST_TOKEN_TIMEOUT=str(MAX_WAIT + RETRY_DEADLINE + 5),
    )
    key = api_key_factory("learner", rpm_limit=10**6, tpm_limit=10**9, max_concurrent=10**4)
    samples = LearnedSamples(gateway.base_url, token, every=2.0)
    samples.start()
    try:
        tally = asyncio.run(
            offer(gateway.base_url, key, per_second=OFFERED_FACTOR * RPM / 60, seconds=LOAD_SECONDS)
        )
    finally:
        samples.stop()
        upstream_429s = fake_upstream.rejected_429
        fake_upstream.reset_rate_limit()
    verdict = evaluate(tally=tally, samples=samples.samples, duration=LOAD_SECONDS, real={"rpm": RPM})
    report = json.dumps(
        {"clients": tally.to_json(), "upstream_429s": upstream_429s, **verdict}, default=str
    )

    # Every call was answered: served, or turned away by the gateway itself (5x is more than the
    # upstream takes), or a 429 from upstream (the goal below bounds those).
    assert tally.calls == OFFERED_FACTOR * RPM / 60 * LOAD_SECONDS, report
    assert tally.outcomes["other"] == 0, report
    # The goals are the full run's, not loosened: with the upstream's headers the gateway can
    # learn its limit from the first answer, so 20 s show it settled (judged from 80% of the load
    # on) and count the 429s. What the short run cannot show is the rest of the full run: 20 s
    # of load, and the ~3 s the last calls wait, do not fill the fake's sliding minute, so the
    # AIMD cut and recovery after an upstream 429 are not exercised here; and without headers
    # the first 429, the only thing to learn from, comes about 40 s in. The full run judges both.
    share = verdict["goals"]["upstream_429_share"]
    assert share["measured"] < GOAL_UPSTREAM_429_SHARE, report
    learned = verdict["goals"]["learned_rpm"]
    assert learned["settled"] is not None, report
    assert learned["measured"] <= GOAL_LEARNED_ERROR, report
    # It did learn: the published figure (50% too high) is not what it kept to.
    assert abs(learned["settled"] - RPM * PUBLISHED_FACTOR) > GOAL_LEARNED_ERROR * RPM, report
    assert tally.outcomes[UPSTREAM_429] == share["count"]
