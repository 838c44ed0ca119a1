"""Fixtures for an end user's own page: users who can log in, and ledger rows written as the gateway writes them."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from django.test import Client

from billing.models import UsageRecord
from billing.selectors import rates_for
from billing.services import account_get_or_create, usage_record_create
from llmgateway.models import ApiKey
from tests.gating.conftest import clean_redis  # noqa: F401 - a fixture (the shared test Redis, emptied)

PASSWORD = "correct horse battery"


@pytest.fixture
def call_factory() -> Callable[..., UsageRecord]:
    """`make(user, at=..., model=..., api_key=None, prompt=..., completion=...)`: one ledger row and its rollups."""

    def make(
        user: Any, *, at: datetime, model: str = "gpt-4o-mini", api_key: ApiKey | None = None,
        prompt: int = 1200, completion: int = 300, status: str = "completed",
    ) -> UsageRecord:
        rates = rates_for(account=account_get_or_create(user_id=user.pk), model=model, at=at)
        assert rates is not None, f"no price for {model}"
        return usage_record_create(
            request_id=uuid.uuid4(), user_id=user.pk, api_key_id=api_key.pk if api_key else None, model=model,
            upstream_model=model, provider="openai", stream=True, status=status,
            error_kind="" if status == "completed" else status, prompt_tokens=prompt, completion_tokens=completion,
            cached_tokens=0, reasoning_tokens=0, token_source="upstream", ttft_us=250_000, duration_us=1_000_000,
            created_at=at, rates=rates,
        )

    return make


@pytest.fixture
def user_factory(django_user_model: Any) -> Callable[..., Any]:
    def make(username: str, password: str | None = PASSWORD) -> Any:
        return django_user_model.objects.create_user(username=username, password=password)

    return make


@pytest.fixture
def client_for() -> Callable[..., Client]:
    """A test client logged in as `user` (CSRF checks on when asked)."""

    def make(user: Any, *, enforce_csrf_checks: bool = False) -> Client:
        client = Client(enforce_csrf_checks=enforce_csrf_checks)
        client.force_login(user)
        return client

    return make
