"""Billing through the real gateway (Granian, the test database): holds under concurrency,
unpriced models, the completion cap, and OpenAI-style quota errors."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import openai
import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from billing.models import Price, Reservation, UsageRecord
from billing.money import money_sum
from billing.selectors import ledger_totals, rollup_totals
from billing.services import PRICE_MISSING, account_quota_set
from streaming.pipeline import CAP_REACHED
from streaming.tokens import count_chat_prompt_tokens, count_text_tokens

from .conftest import rates_now

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.ledger]

MESSAGES = [{"role": "user", "content": "Tell me about budgets."}]
CONCURRENT = 50
MAX_TOKENS = 20  # sim-fast produces 64 tokens, so every call uses exactly its max_tokens


def user_named(username: str):
    return get_user_model().objects.get(username=username)


def post(gateway, key: str, body: dict, client: httpx.Client | None = None) -> httpx.Response:
    return (client or httpx).post(
        f"{gateway.api_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=30
    )


def test_fifty_concurrent_requests_never_spend_past_a_budget_that_fits_ten(gateway, api_key_factory) -> None:
    key = api_key_factory("spender")
    user = user_named("spender")
    prompt = count_chat_prompt_tokens(MESSAGES, model="sim-fast")
    estimate = rates_now(user, "sim-fast", timezone.now()).cost(prompt_tokens=prompt, cached_tokens=0, completion_tokens=MAX_TOKENS)
    budget = money_sum([estimate] * 10)
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=budget)
    start = threading.Barrier(CONCURRENT)

    with httpx.Client(limits=httpx.Limits(max_connections=CONCURRENT)) as client:

        def send(index: int) -> httpx.Response:
            start.wait()
            body = {"model": "sim-fast", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": index % 2 == 0}
            return post(gateway, key, body, client)

        with ThreadPoolExecutor(CONCURRENT) as pool:
            responses = list(pool.map(send, range(CONCURRENT)))

    admitted = [response for response in responses if response.status_code == 200]
    refused = [response for response in responses if response.status_code != 200]
    # Every call costs exactly its estimate, so exactly ten fit, however they interleave.
    assert len(admitted) == 10
    for response in refused:
        assert response.status_code == 429
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    for response in admitted:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.endswith("data: [DONE]\n\n")
    # Each admitted call has exactly one ledger row; refused ones have none.
    admitted_ids = {uuid.UUID(response.headers["x-request-id"]) for response in admitted}
    assert set(UsageRecord.objects.filter(user=user).values_list("request_id", flat=True)) == admitted_ids
    ledger = ledger_totals(user_id=user.pk)
    assert ledger.requests == 10
    assert ledger.cost_usd <= budget
    assert ledger.cost_usd == budget  # nothing beyond the estimates
    assert ledger == rollup_totals(user_id=user.pk)
    assert not Reservation.objects.exists()


def test_an_unpriced_model_is_refused_before_any_upstream_call(gateway, api_key, fake_upstream) -> None:
    Price.objects.filter(model="gpt-4o-mini")._raw_delete(using="default")
    calls_before = len(fake_upstream.requests)
    response = post(gateway, api_key, {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["message"] == PRICE_MISSING.format(model="gpt-4o-mini")
    assert error["code"] == "gateway_misconfigured"
    assert len(fake_upstream.requests) == calls_before
    assert not UsageRecord.objects.exists()


def test_a_call_is_billed_at_the_rates_it_was_admitted_with(gateway, api_key, fake_upstream) -> None:
    fake_upstream.tokens = 7
    response = post(gateway, api_key, {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 50})
    assert response.status_code == 200
    usage = response.json()["usage"]
    record = UsageRecord.objects.get()
    assert (record.prompt_tokens, record.completion_tokens) == (usage["prompt_tokens"], 7)
    assert (record.input_usd_per_1m, record.output_usd_per_1m, record.price_source) == (Decimal("0.15"), Decimal("0.60"), "catalog")
    assert record.cost_usd == (record.prompt_tokens * Decimal("0.15") + 7 * Decimal("0.60")) / 1_000_000
    assert record.reserved_usd is None  # no limits: priced, nothing held


def test_an_exhausted_budget_is_an_openai_rate_limit_error_of_type_insufficient_quota(gateway, api_key_factory) -> None:
    key = api_key_factory("broke")
    account_quota_set(user_id=user_named("broke").pk, monthly_spend_limit_usd=Decimal("0"))
    client = openai.OpenAI(base_url=gateway.api_url, api_key=key, max_retries=0, timeout=10)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="sim-fast", messages=MESSAGES)
    assert raised.value.code == "insufficient_quota"
    assert raised.value.type == "insufficient_quota"
    assert not UsageRecord.objects.exists()


CAP = 5


@pytest.fixture
def capped_gateway(gateway_factory):
    return gateway_factory(GATEWAY_DEFAULT_MAX_TOKENS=str(CAP))


def test_a_stream_reaching_its_hold_is_stopped_and_billed_for_what_it_produced(capped_gateway, api_key_factory, fake_upstream) -> None:
    key = api_key_factory("capped")
    account_quota_set(user_id=user_named("capped").pk, monthly_spend_limit_usd=Decimal("1"))
    fake_upstream.tokens = 50
    fake_upstream.inter_token_delay = 0.02  # still sending when the cap is reached
    response = post(capped_gateway, key, {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True})
    frames = [frame.removeprefix("data: ") for frame in response.text.split("\n\n") if frame.startswith("data: ")]
    contents = [json.loads(frame)["choices"][0]["delta"].get("content") for frame in frames[:-1]]
    assert contents.count("tok ") == CAP
    error = json.loads(frames[-1])["error"]
    assert error == {"message": CAP_REACHED.format(cap=CAP), "type": "insufficient_quota", "param": None, "code": "budget_reservation_reached"}
    assert "[DONE]" not in response.text
    record = UsageRecord.objects.get()
    assert (record.status, record.error_kind, record.token_source) == ("rejected", "budget_cap", "estimated")
    # Counted from the text produced, and never billed past what was reserved.
    assert record.completion_tokens == min(count_text_tokens("tok " * CAP, model="gpt-4o-mini"), CAP)
    assert record.reserved_usd is not None
    assert not Reservation.objects.exists()
    # The gateway hung up on the upstream mid-stream: it stopped producing (and billing) at once.
    upstream_call = fake_upstream.requests[-1]
    assert fake_upstream.wait_until(lambda: upstream_call.closed_at is not None, timeout=5)
    assert upstream_call.client_disconnected and not upstream_call.completed


def test_a_non_streamed_call_reaching_its_hold_is_a_400(capped_gateway, api_key_factory, fake_upstream) -> None:
    key = api_key_factory("capped-json")
    account_quota_set(user_id=user_named("capped-json").pk, monthly_spend_limit_usd=Decimal("1"))
    fake_upstream.tokens = 50
    response = post(capped_gateway, key, {"model": "gpt-4o-mini", "messages": MESSAGES})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == CAP_REACHED.format(cap=CAP)
    assert UsageRecord.objects.get().status == "rejected"
    # With max_tokens the upstream stops itself: no cap.
    response = post(capped_gateway, key, {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 12})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 12
