"""Console fixtures: a frozen clock for the page, staff with and without the cost permission, and
ledger rows written through the real service (so the rollups are what the gateway keeps).

Calls are billed at the tests' own rates: USD 1,000 per 1M prompt tokens and USD 2,000 per 1M
completion tokens, so 1,000 prompt tokens cost exactly $1 and amounts are easy to state.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from billing.models import UsageRecord
from billing.money import Rates
from billing.services import usage_record_create

# A Sunday, well after the default catalog's effective_from.
NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
MODEL = "console-test"
RATES = Rates(input=Decimal(1000), cached_input=Decimal(1000), output=Decimal(2000))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[datetime], None]:
    """Freeze the console's `now` at an instant (NOW until set)."""
    from billing.console import views

    def set_now(at: datetime) -> None:
        monkeypatch.setattr(views, "now", lambda: at)

    set_now(NOW)
    return set_now


@pytest.fixture
def call(db: None) -> Callable[..., UsageRecord]:
    """Write one finished call as the gateway does (ledger row, rollups, settled hold)."""

    def write(
        user: Any,
        *,
        at: datetime = NOW,
        prompt: int = 1000,
        completion: int = 0,
        model: str = MODEL,
        status: str = "completed",
        api_key_id: int | None = None,
        ttft_us: int | None = 250_000,
        endpoint: str = UsageRecord.Endpoint.CHAT_COMPLETIONS,
        upstream_id: str = "",
    ) -> UsageRecord:
        return usage_record_create(
            request_id=uuid.uuid4(),
            user_id=user.pk,
            api_key_id=api_key_id,
            model=model,
            upstream_model=model,
            provider="simulator",
            stream=True,
            status=status,
            error_kind="",
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=0,
            reasoning_tokens=0,
            token_source="upstream",
            ttft_us=ttft_us,
            duration_us=1_000_000,
            created_at=at,
            rates=RATES,
            endpoint=endpoint,
            upstream_id=upstream_id,
        )

    return write


@pytest.fixture
def user_factory(django_user_model: Any) -> Callable[..., Any]:
    counter = iter(range(1_000_000))

    def make(username: str | None = None, **fields: Any) -> Any:
        return django_user_model.objects.create(username=username or f"console-user-{next(counter)}", **fields)

    return make


@pytest.fixture
def staff_factory(user_factory: Callable[..., Any]) -> Callable[..., Any]:
    """A staff member (not a superuser) with the named permissions (`app_label.codename`)."""

    def make(username: str, *permissions: str) -> Any:
        user = user_factory(username, is_staff=True)
        for permission in permissions:
            app_label, codename = permission.split(".")
            user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
        return user

    return make


@pytest.fixture
def cost_viewer(staff_factory: Callable[..., Any]) -> Any:
    return staff_factory("viewer", "billing.view_usagerecord")


@pytest.fixture
def console_url() -> str:
    return reverse("admin:console")


@pytest.fixture
def viewer_client(client: Any, cost_viewer: Any) -> Iterator[Any]:
    client.force_login(cost_viewer)
    yield client
