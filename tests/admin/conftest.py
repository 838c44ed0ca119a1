"""Admin fixtures: a ledger of chosen size written the way the gateway writes it, and staff clients."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone

from billing.models import UsageRecord
from billing.selectors import rates_for
from billing.services import (
    account_get_or_create,
    account_quota_set,
    budget_reserve,
    usage_record_create,
)
from llmgateway.models import ApiKey
from llmgateway.services import api_key_create
from llmgateway.staff import COST_VIEWERS

MODELS = ("gpt-4o-mini", "gpt-4o")
STATUSES = ("completed", "completed", "cancelled", "upstream_error", "timeout")
PASSWORD = "correct horse battery"
# Every third call is made through the Responses API, the others through chat completions.
ENDPOINTS = (UsageRecord.Endpoint.CHAT_COMPLETIONS, UsageRecord.Endpoint.RESPONSES, UsageRecord.Endpoint.CHAT_COMPLETIONS)


@dataclass
class Ledger:
    users: list[Any] = field(default_factory=list)
    keys: list[ApiKey] = field(default_factory=list)
    records: list[UsageRecord] = field(default_factory=list)


def ledger_row(
    user: Any, *, api_key: ApiKey | None, model: str, status: str, at: datetime, prompt: int, completion: int,
    endpoint: str = UsageRecord.Endpoint.CHAT_COMPLETIONS, upstream_id: str = "",
) -> UsageRecord:
    """One ledger row (and its rollup), as the gateway writes it when a call ends."""
    rates = rates_for(account=account_get_or_create(user_id=user.pk), model=model, at=at)
    assert rates is not None, f"no price for {model}"
    return usage_record_create(
        request_id=uuid.uuid4(),
        user_id=user.pk,
        api_key_id=api_key.pk if api_key is not None else None,
        model=model,
        upstream_model=model,
        provider="openai",
        stream=True,
        status=status,
        error_kind="" if status == "completed" else status,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=prompt // 4,
        reasoning_tokens=0,
        token_source="upstream",
        ttft_us=250_733,
        duration_us=1_234_567,
        created_at=at,
        rates=rates,
        endpoint=endpoint,
        upstream_id=upstream_id,
    )


@pytest.fixture
def ledger_factory(django_user_model: Any) -> Callable[..., Ledger]:
    """`make(rows)`: `rows` calls over rows // 5 users (a key each, a budget, a live hold),
    both models, every ending and two endpoints (`ENDPOINTS`, each answer with its upstream id),
    the chat page's calls (no key) among them."""
    counter = iter(range(1_000_000))

    def make(rows: int, *, at: datetime | None = None) -> Ledger:
        at = at or timezone.now()
        ledger = Ledger()
        for _ in range(max(1, rows // 5)):
            user = django_user_model.objects.create(username=f"spender-{next(counter)}")
            api_key, _ = api_key_create(username=user.username, name=f"{user.username}'s service")
            account_quota_set(user_id=user.pk, monthly_spend_limit_usd=Decimal("5"))
            budget_reserve(
                user_id=user.pk, model="gpt-4o", upstream_model="gpt-4o", prompt_tokens=1000,
                completion_tokens=1000, request_id=uuid.uuid4(), now=timezone.now(),
            )
            ledger.users.append(user)
            ledger.keys.append(api_key)
        for i in range(rows):
            user = ledger.users[i % len(ledger.users)]
            ledger.records.append(
                ledger_row(
                    user,
                    api_key=None if i % 4 == 3 else ledger.keys[i % len(ledger.keys)],
                    model=MODELS[i % len(MODELS)],
                    status=STATUSES[i % len(STATUSES)],
                    at=at,
                    prompt=1000 + 37 * i,
                    completion=500 + 11 * i,
                    endpoint=ENDPOINTS[i % len(ENDPOINTS)],
                    upstream_id=f"{'resp_' if ENDPOINTS[i % len(ENDPOINTS)] == 'responses' else 'chatcmpl-'}{uuid.uuid4().hex}",
                )
            )
        return ledger

    return make


@pytest.fixture
def cost_viewer(django_user_model: Any) -> Any:
    """Staff, not a superuser, in the "Cost viewers" group only."""
    user = django_user_model.objects.create_user(username="viewer", password=PASSWORD, is_staff=True)
    user.groups.add(Group.objects.get(name=COST_VIEWERS))
    return user


@pytest.fixture
def viewer_client(cost_viewer: Any) -> Client:
    client = Client()
    client.force_login(cost_viewer)
    return client
