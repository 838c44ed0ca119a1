"""The billing admin: every page loads in a bounded number of queries; history stays read-only."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.models import Price, PricingPlan, Reservation
from billing.services import account_quota_set
from llmgateway.services import api_key_create

from .conftest import admit, record_call

pytestmark = [pytest.mark.django_db, pytest.mark.ledger]


@pytest.fixture
def populated(user_factory):
    plan = PricingPlan.objects.create(name="gold", multiplier=Decimal("1.2"))
    for _ in range(5):
        user = user_factory()
        api_key_create(username=user.username)
        account_quota_set(user_id=user.pk, plan=plan, monthly_spend_limit_usd=Decimal("5"))
        now = timezone.now()
        record_call(user, at=now)
        record_call(user, model="gpt-4o", at=now)
        admit(user, at=now)
    return plan


@pytest.mark.parametrize(
    "model",
    ["price", "pricingplan", "account", "usagerecord", "dailyusage", "reservation"],
)
def test_changelists_load_in_bounded_queries(admin_client, populated, django_assert_max_num_queries, model) -> None:
    with django_assert_max_num_queries(12):
        response = admin_client.get(reverse(f"admin:billing_{model}_changelist"))
    assert response.status_code == 200


def test_api_keys_are_listed_and_created_in_the_admin(admin_client, populated, django_assert_max_num_queries) -> None:
    """Creation itself (the secret shown once) is specified in tests/admin/test_api_keys.py."""
    with django_assert_max_num_queries(12):
        assert admin_client.get(reverse("admin:llmgateway_apikey_changelist")).status_code == 200
    assert admin_client.get(reverse("admin:llmgateway_apikey_add")).status_code == 200


def test_the_account_list_shows_this_months_spend(admin_client, populated) -> None:
    response = admin_client.get(reverse("admin:billing_account_changelist"))
    # Two calls per account at 1.2 x list price: (0.00045 (gpt-4o-mini) + 0.0075 (gpt-4o)) x 1.2
    assert response.context["cl"].result_list[0]._month_spend == Decimal("0.00954")


def test_a_price_in_effect_is_read_only_and_a_future_one_editable(admin_client) -> None:
    current = Price.objects.get(model="gpt-4o")
    future = Price.objects.create(model="gpt-4o", input_usd_per_1m=Decimal("3"), output_usd_per_1m=Decimal("12"), effective_from=datetime(2099, 1, 1, tzinfo=UTC))
    page = admin_client.get(reverse("admin:billing_price_change", args=[current.pk]))
    assert 'name="input_usd_per_1m"' not in page.content.decode()
    assert admin_client.get(reverse("admin:billing_price_delete", args=[current.pk])).status_code == 403
    page = admin_client.get(reverse("admin:billing_price_change", args=[future.pk]))
    assert 'name="input_usd_per_1m"' in page.content.decode()


def test_the_ledger_cannot_be_written_through_the_admin(admin_client, user) -> None:
    record = record_call(user)
    assert admin_client.get(reverse("admin:billing_usagerecord_add")).status_code == 403
    response = admin_client.post(reverse("admin:billing_usagerecord_change", args=[record.pk]), {"completion_tokens": 0})
    assert response.status_code == 403
    assert admin_client.get(reverse("admin:billing_usagerecord_delete", args=[record.pk])).status_code == 403


def test_a_stuck_hold_can_be_deleted_by_staff(admin_client, user) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=Decimal("1"))
    admit(user)
    hold = Reservation.objects.get()
    response = admin_client.post(reverse("admin:billing_reservation_delete", args=[hold.pk]), {"post": "yes"})
    assert response.status_code == 302
    assert not Reservation.objects.exists()


def test_a_calls_id_finds_every_attempt_and_each_row_says_which_it_is(admin_client, user) -> None:
    call_id = uuid.uuid4()
    failed = record_call(user, status="upstream_error", prompt=0, completion=0, call_id=call_id, attempt=1)
    answered = record_call(user, request_id=call_id, call_id=call_id, attempt=2)
    other = record_call(user)
    found = admin_client.get(reverse("admin:billing_usagerecord_changelist"), {"q": str(call_id)})
    shown = {record.pk for record in found.context["cl"].result_list}
    assert shown == {failed.pk, answered.pk}
    page = admin_client.get(reverse("admin:billing_usagerecord_change", args=[failed.pk])).content.decode()
    assert "1 of <a" in page and f"2 attempts of call {call_id}" in page
    alone = admin_client.get(reverse("admin:billing_usagerecord_change", args=[other.pk])).content.decode()
    assert "1 (the only one)" in alone
