"""Billing fixtures: users with accounts, prices at chosen instants, and ledger writes at a frozen
instant (services take `now`/`created_at`, so no test waits for a clock)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from billing.models import Price, UsageRecord
from billing.money import Rates
from billing.selectors import rates_for
from billing.services import account_get_or_create, budget_reserve, usage_record_create

# A frozen "now" well after the default catalog's effective_from (2024-01-01).
NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
def user_factory(django_user_model: Any) -> Callable[..., Any]:
    counter = iter(range(1_000_000))

    def make(username: str | None = None) -> Any:
        return django_user_model.objects.create(username=username or f"billing-user-{next(counter)}")

    return make


@pytest.fixture
def user(user_factory: Callable[..., Any]) -> Any:
    return user_factory("payer")


@pytest.fixture
def price_factory() -> Callable[..., Price]:
    def make(model: str, input: str, cached: str | None, output: str, *, effective_from: datetime = datetime(2020, 1, 1, tzinfo=UTC)) -> Price:
        return Price.objects.create(
            model=model,
            input_usd_per_1m=Decimal(input),
            cached_input_usd_per_1m=None if cached is None else Decimal(cached),
            output_usd_per_1m=Decimal(output),
            effective_from=effective_from,
        )

    return make


def rates_now(user: Any, model: str, at: datetime = NOW) -> Rates:
    rates = rates_for(account=account_get_or_create(user_id=user.pk), model=model, at=at)
    assert rates is not None, f"no price for {model}"
    return rates


def record_call(
    user: Any,
    *,
    model: str = "gpt-4o-mini",
    prompt: int = 1000,
    cached: int = 0,
    completion: int = 500,
    at: datetime = NOW,
    rates: Rates | None = None,
    request_id: uuid.UUID | None = None,
    status: str = "completed",
    call_id: uuid.UUID | None = None,
    attempt: int = 1,
    endpoint: str = UsageRecord.Endpoint.CHAT_COMPLETIONS,
    upstream_id: str = "",
) -> UsageRecord:
    """Write one ledger row the way the gateway does when a call (or one of its attempts) ends."""
    return usage_record_create(
        call_id=call_id,
        attempt=attempt,
        request_id=request_id or uuid.uuid4(),
        user_id=user.pk,
        api_key_id=None,
        model=model,
        upstream_model=model,
        provider="openai",
        stream=True,
        status=status,
        error_kind="",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        reasoning_tokens=0,
        token_source="upstream",
        ttft_us=1000,
        duration_us=2000,
        created_at=at,
        rates=rates or rates_now(user, model, at),
        endpoint=endpoint,
        upstream_id=upstream_id,
    )


def admit(user: Any, *, model: str = "gpt-4o-mini", prompt: int = 1000, completion: int = 500, at: datetime = NOW, request_id: uuid.UUID | None = None):
    """Admit a call the way `chat_call_prepare` does; return the admission and its request id."""
    request_id = request_id or uuid.uuid4()
    admission = budget_reserve(
        user_id=user.pk,
        model=model,
        upstream_model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        request_id=request_id,
        now=at,
    )
    return admission, request_id
