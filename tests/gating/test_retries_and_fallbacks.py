"""Upstream failures before the first token are the gateway's to absorb: retried on another
deployment or after a backoff, then a fallback model, within a deadline; a deployment that keeps
failing is skipped for a while; what the upstream says of its limits is learned. Every attempt
that reached an upstream is a ledger row, linked to the call; only the answering one costs.

Served gateways (Granian) configured by an UPSTREAMS_FILE, against fake OpenAI-compatible upstreams.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from billing.models import Price, UsageRecord
from streaming.tokens import count_text_tokens
from tests.gating.conftest import chat_body

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def backup_upstream() -> Iterator[Any]:
    from testbed.fake_upstream import FakeUpstream

    with FakeUpstream().running_in_thread() as server:
        yield server


def upstreams_file(
    tmp_path: Path, *, providers: dict[str, str], models: list[dict[str, Any]], settings: dict[str, dict[str, Any]] | None = None
) -> str:
    document = {
        "providers": [
            {"name": name, "kind": "openai", "base_url": url, **(settings or {}).get(name, {})} for name, url in providers.items()
        ],
        "models": models,
    }
    path = tmp_path / "upstreams.json"
    path.write_text(json.dumps(document))
    return str(path)


def primary_only(tmp_path: Path, primary: Any, **deployment: Any) -> str:
    """gpt-4o-mini served by one deployment."""
    return upstreams_file(
        tmp_path,
        providers={"primary": primary.base_url},
        models=[{"name": "gpt-4o-mini", "deployments": [{"provider": "primary", **deployment}]}],
    )


def primary_then_backup(tmp_path: Path, primary: Any, backup: Any, **primary_settings: Any) -> str:
    """gpt-4o-mini served by two deployments, tried in that order."""
    return upstreams_file(
        tmp_path,
        providers={"primary": primary.base_url, "backup": backup.base_url},
        settings={"primary": primary_settings},
        models=[
            {
                "name": "gpt-4o-mini",
                "deployments": [{"provider": "primary", "priority": 0}, {"provider": "backup", "priority": 1}],
            }
        ],
    )


def post(gateway: Any, key: str, *, model: str = "gpt-4o-mini", stream: bool = False) -> httpx.Response:
    return httpx.post(
        f"{gateway.api_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json=chat_body(model, stream=stream),
        timeout=30,
    )


def call_rows(response: httpx.Response) -> list[UsageRecord]:
    """The call's ledger rows, first attempt first; the last one's request_id is the call's."""
    call_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while not UsageRecord.objects.filter(request_id=call_id).exists():
        assert time.monotonic() < deadline, "the call's row was not written"
        time.sleep(0.02)
    return list(UsageRecord.objects.filter(call_id=call_id).order_by("attempt"))


METRICS_TOKEN = "metrics-token-for-tests"


def metric(gateway: Any, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{gateway.base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=5).text
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return None


def test_an_upstream_that_answers_every_second_request_429_gives_every_client_an_answer(
    gateway_factory, api_key, fake_upstream, tmp_path
) -> None:
    fake_upstream.fault_schedule = ["429", None]
    fake_upstream.retry_after = 0.05
    path = primary_only(tmp_path, fake_upstream)
    gateway = gateway_factory(UPSTREAMS_FILE=path, UPSTREAM_BACKOFF_BASE="0.05")
    client = openai.OpenAI(base_url=gateway.api_url, api_key=api_key, max_retries=0)
    answers = []
    for _ in range(20):  # the client's own retries are off: the gateway absorbs the 429s
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        ) as raw:
            assert raw.headers["x-gateway-attempts"] == "2"
            text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
            answers.append((raw.headers["x-request-id"], text))
    assert all(text for _, text in answers)
    for call_id, _ in answers:
        refused, answered = UsageRecord.objects.filter(call_id=call_id).order_by("attempt")
        assert (refused.status, refused.error_kind, refused.cost_usd) == ("upstream_error", "rate_limited", 0)
        assert (answered.status, str(answered.request_id)) == ("completed", call_id)
        assert answered.cost_usd > 0


def test_another_deployment_answers_at_once_when_the_first_fails(gateway_factory, api_key, fake_upstream, backup_upstream, tmp_path) -> None:
    fake_upstream.fault = "500"
    path = primary_then_backup(tmp_path, fake_upstream, backup_upstream)
    gateway = gateway_factory(UPSTREAMS_FILE=path)
    started = time.monotonic()
    response = post(gateway, api_key)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 2  # no backoff: another deployment was there
    assert response.headers["x-gateway-deployment"] == "backup/gpt-4o-mini"
    failed, answered = call_rows(response)
    assert (failed.provider, failed.status, failed.error_kind, failed.cost_usd) == ("primary", "upstream_error", "server_error", 0)
    assert (answered.provider, answered.status) == ("backup", "completed")
    assert answered.cost_usd > 0


@pytest.mark.ledger  # the attempts' rows and the fallback's price, on SQLite too
def test_a_fallback_model_answers_when_the_primary_is_down_and_is_billed_at_its_price(
    gateway_factory, api_key, fake_upstream, backup_upstream, tmp_path
) -> None:
    fake_upstream.fault = "500"
    path = upstreams_file(
        tmp_path,
        providers={"primary": fake_upstream.base_url, "backup": backup_upstream.base_url},
        models=[
            {"name": "gpt-4o-mini", "fallbacks": ["gpt-4.1-nano"], "deployments": [{"provider": "primary"}]},
            {"name": "gpt-4.1-nano", "deployments": [{"provider": "backup"}]},
        ],
    )
    gateway = gateway_factory(UPSTREAMS_FILE=path, UPSTREAM_BACKOFF_BASE="0.05")
    response = post(gateway, api_key, stream=True)
    assert response.status_code == 200, response.text
    assert "data: [DONE]" in response.text
    assert response.headers["x-gateway-model"] == "gpt-4.1-nano"
    assert response.headers["x-gateway-deployment"] == "backup/gpt-4.1-nano"
    *failed, answered = call_rows(response)
    assert len(failed) == 3  # UPSTREAM_MAX_ATTEMPTS on the primary, then the fallback
    assert [(row.model, row.status, row.cost_usd) for row in failed] == [("gpt-4o-mini", "upstream_error", 0)] * 3
    assert (answered.model, answered.requested_model, answered.status) == ("gpt-4.1-nano", "gpt-4o-mini", "completed")
    nano = Price.objects.get(model="gpt-4.1-nano")
    assert (answered.input_usd_per_1m, answered.output_usd_per_1m) == (nano.input_usd_per_1m, nano.output_usd_per_1m)
    expected = (answered.prompt_tokens * nano.input_usd_per_1m + answered.completion_tokens * nano.output_usd_per_1m) / Decimal(1_000_000)
    assert answered.cost_usd == expected


def test_when_every_attempt_fails_the_client_gets_the_upstreams_error_and_each_attempt_is_a_row(
    gateway_factory, api_key, fake_upstream, tmp_path
) -> None:
    fake_upstream.fault = "500"
    path = primary_only(tmp_path, fake_upstream)
    gateway = gateway_factory(UPSTREAMS_FILE=path, UPSTREAM_BACKOFF_BASE="0.05")
    response = post(gateway, api_key, stream=True)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert response.headers["x-gateway-attempts"] == "3"
    rows = call_rows(response)
    assert [row.attempt for row in rows] == [1, 2, 3]
    assert all((row.status, row.cost_usd) == ("upstream_error", 0) for row in rows)


def test_nothing_is_retried_once_a_token_reached_the_client(gateway_factory, api_key, fake_upstream, tmp_path) -> None:
    fake_upstream.fault = "cut"
    fake_upstream.fault_after_tokens = 2
    path = primary_only(tmp_path, fake_upstream)
    gateway = gateway_factory(UPSTREAMS_FILE=path)
    fake_upstream.clear_requests()
    response = post(gateway, api_key, stream=True)
    assert response.status_code == 200
    assert '"code":"upstream_error"' in response.text.replace(" ", "") and "[DONE]" not in response.text
    assert len(fake_upstream.requests) == 1
    (row,) = call_rows(response)
    assert (row.status, row.error_kind) == ("upstream_error", "connection")
    streamed = "".join(
        event["choices"][0]["delta"].get("content") or ""
        for line in response.text.splitlines()
        if line.startswith("data: {") and (event := json.loads(line[6:])).get("choices")
    )
    assert streamed and row.completion_tokens == count_text_tokens(streamed, model="gpt-4o-mini")
    assert row.cost_usd > 0  # billed for what it produced


def test_the_retry_deadline_bounds_how_long_a_client_waits(gateway_factory, api_key, fake_upstream, tmp_path) -> None:
    fake_upstream.fault = "429"
    fake_upstream.retry_after = 5
    path = primary_only(tmp_path, fake_upstream)
    gateway = gateway_factory(UPSTREAMS_FILE=path, UPSTREAM_RETRY_DEADLINE="2")
    started = time.monotonic()
    response = post(gateway, api_key)
    assert time.monotonic() - started < 1.5  # a 5 s retry-after does not fit a 2 s deadline
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "upstream_rate_limited"
    assert response.headers["retry-after"] == "5"


def test_a_failing_deployment_is_skipped_while_its_breaker_is_open_then_probed(
    gateway_factory, api_key, fake_upstream, backup_upstream, tmp_path
) -> None:
    fake_upstream.fault = "500"
    path = primary_then_backup(tmp_path, fake_upstream, backup_upstream)
    gateway = gateway_factory(
        UPSTREAMS_FILE=path, UPSTREAM_BREAKER_FAILURES="2", UPSTREAM_BREAKER_COOLDOWN="1.5", METRICS_TOKEN=METRICS_TOKEN
    )
    for _ in range(2):
        assert post(gateway, api_key).headers["x-gateway-attempts"] == "2"
    assert metric(gateway, "llmgateway_upstream_breaker_state", deployment="primary/gpt-4o-mini") == 2
    fake_upstream.clear_requests()
    skipped = post(gateway, api_key)
    assert skipped.headers["x-gateway-attempts"] == "1"  # straight to the backup
    assert skipped.headers["x-gateway-deployment"] == "backup/gpt-4o-mini"
    assert not fake_upstream.requests
    fake_upstream.fault = None
    time.sleep(1.6)
    probe = post(gateway, api_key)
    assert probe.headers["x-gateway-deployment"] == "primary/gpt-4o-mini"
    assert metric(gateway, "llmgateway_upstream_breaker_state", deployment="primary/gpt-4o-mini") == 0


def test_the_upstreams_own_limit_is_learned_from_its_headers(gateway_factory, api_key, fake_upstream, clean_redis, tmp_path) -> None:
    fake_upstream.rpm_limit = 30
    fake_upstream.rate_limit_headers = True
    fake_upstream.reset_rate_limit()
    path = primary_only(tmp_path, fake_upstream, rpm=100)
    gateway = gateway_factory(UPSTREAMS_FILE=path, REDIS_URL=clean_redis, METRICS_TOKEN=METRICS_TOKEN)
    assert post(gateway, api_key).status_code == 200
    # Published 100 per minute, but the upstream says 30: the gateway keeps to 30.
    assert metric(gateway, "llmgateway_upstream_learned_limit", deployment="primary/gpt-4o-mini", unit="rpm") == 30


def test_an_upstream_429_cuts_the_learned_limit_by_a_fifth(gateway_factory, api_key, fake_upstream, clean_redis, tmp_path) -> None:
    fake_upstream.fault_schedule = ["429", None]
    fake_upstream.retry_after = 0.1
    # The session's fake sends no x-ratelimit-* headers: an upstream that publishes nothing,
    # whose 429s alone teach.
    path = primary_only(tmp_path, fake_upstream, rpm=100)
    gateway = gateway_factory(UPSTREAMS_FILE=path, REDIS_URL=clean_redis, METRICS_TOKEN=METRICS_TOKEN)
    assert post(gateway, api_key).status_code == 200
    learned = metric(gateway, "llmgateway_upstream_learned_limit", deployment="primary/gpt-4o-mini", unit="rpm")
    assert learned is not None and 64 <= learned < 65  # 100 less the headroom, cut by a fifth; regaining 5 a minute


def test_an_upstream_that_sends_no_first_token_in_time_is_left_for_another_deployment(
    gateway_factory, api_key, fake_upstream, backup_upstream, tmp_path
) -> None:
    fake_upstream.ttft = 30  # headers at once, then nothing
    path = primary_then_backup(tmp_path, fake_upstream, backup_upstream)
    gateway = gateway_factory(UPSTREAMS_FILE=path, GATEWAY_FIRST_TOKEN_TIMEOUT="1")
    started = time.monotonic()
    response = post(gateway, api_key, stream=True)
    assert response.status_code == 200 and "data: [DONE]" in response.text
    assert time.monotonic() - started < 3
    assert response.headers["x-gateway-deployment"] == "backup/gpt-4o-mini"
    timed_out, answered = call_rows(response)
    assert (timed_out.provider, timed_out.status, timed_out.error_kind, timed_out.cost_usd) == ("primary", "timeout", "timeout", 0)
    assert answered.status == "completed"
    # The stalled upstream call was closed, not left hanging.
    assert fake_upstream.wait_until(lambda: fake_upstream.requests[-1].closed_at is not None, timeout=5)


def test_a_providers_read_timeout_shorter_than_the_gateways_lets_it_be_silent_no_longer(
    gateway_factory, api_key, fake_upstream, backup_upstream, tmp_path
) -> None:
    fake_upstream.ttft = 30  # headers at once, then nothing
    path = primary_then_backup(tmp_path, fake_upstream, backup_upstream, read_timeout=0.5)
    gateway = gateway_factory(UPSTREAMS_FILE=path, GATEWAY_FIRST_TOKEN_TIMEOUT="10")
    started = time.monotonic()
    response = post(gateway, api_key, stream=True)
    assert response.status_code == 200 and "data: [DONE]" in response.text
    assert time.monotonic() - started < 3  # the provider's 0.5 s, not the gateway's 10 s
    timed_out, answered = call_rows(response)
    assert (timed_out.provider, timed_out.status, timed_out.error_kind) == ("primary", "timeout", "timeout")
    assert answered.provider == "backup" and answered.status == "completed"


def test_a_429_over_tokens_cuts_the_learned_tokens_limit_and_leaves_requests_alone(
    gateway_factory, api_key, fake_upstream, clean_redis, tmp_path
) -> None:
    fake_upstream.tpm_limit = 5  # the call's prompt and completion are more: a 429 of type `tokens`
    fake_upstream.reset_rate_limit()
    path = primary_only(tmp_path, fake_upstream, rpm=100, tpm=100_000)
    gateway = gateway_factory(UPSTREAMS_FILE=path, REDIS_URL=clean_redis, METRICS_TOKEN=METRICS_TOKEN, UPSTREAM_RETRY_DEADLINE="1")
    response = post(gateway, api_key)
    assert response.status_code == 429 and response.json()["error"]["code"] == "upstream_rate_limited"
    learned = {unit: metric(gateway, "llmgateway_upstream_learned_limit", deployment="primary/gpt-4o-mini", unit=unit) for unit in ("rpm", "tpm")}
    assert learned["tpm"] is not None and 64_000 <= learned["tpm"] < 64_100  # 100k less the headroom, less a fifth
    assert learned["rpm"] in (None, 80)  # untouched: still the published 100 less the headroom


def test_a_full_bucket_is_waited_on_once_per_call_not_once_per_attempt(gateway_factory, api_key, fake_upstream, clean_redis, tmp_path) -> None:
    path = primary_only(tmp_path, fake_upstream, rpm=2)  # 1.6 a minute: one call, then a long wait
    gateway = gateway_factory(UPSTREAMS_FILE=path, REDIS_URL=clean_redis, UPSTREAM_MAX_WAIT="1")
    assert post(gateway, api_key).status_code == 200
    started = time.monotonic()
    refused = post(gateway, api_key)
    assert time.monotonic() - started < 1.8  # one wait of UPSTREAM_MAX_WAIT, not one per attempt
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "upstream_capacity"
