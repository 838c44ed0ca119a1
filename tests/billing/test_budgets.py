"""Budgets: reserve the worst case before the call, settle to the actual cost after it.

Calls are admitted at a frozen instant (`now=`), so periods and hold expiry are moved, not waited for.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.conf import settings as django_settings
from django.db import connection

from billing.exceptions import QuotaExceeded
from billing.models import Account, Reservation
from billing.selectors import PeriodUsage, period_usage
from billing.services import (
    SPEND_QUOTA_EXCEEDED,
    TOKEN_QUOTA_EXCEEDED,
    account_quota_set,
    budget_release,
)
from llmgateway.errors import api_error_for

from .conftest import NOW, admit, record_call

pytestmark = pytest.mark.ledger
D = Decimal
# admit()'s default call: gpt-4o-mini, 1000 prompt + up to 500 completion tokens.
ESTIMATE = D("0.00045")  # 1000 x 0.15 + 500 x 0.60 per 1M


def settle(user, request_id, admission, *, completion: int, at: datetime = NOW) -> None:
    record_call(user, request_id=request_id, rates=admission.rates, completion=completion, at=at)


@pytest.mark.django_db
def test_holds_fit_up_to_the_limit_exactly_and_the_next_call_is_refused(user) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=ESTIMATE * 3)
    admissions = [admit(user)[0] for _ in range(3)]
    assert [admission.reserved_usd for admission in admissions] == [ESTIMATE] * 3
    assert [admission.reserved_tokens for admission in admissions] == [1500] * 3
    with pytest.raises(QuotaExceeded) as raised:
        admit(user)
    assert raised.value.message == SPEND_QUOTA_EXCEEDED.format(
        needed="$0.000450", remaining="$0.000000", period="monthly", limit="$0.001350"
    )
    answer = api_error_for(raised.value)  # the API's answer to it
    assert answer is not None and answer.status == 429
    assert answer.body()["error"]["type"] == "insufficient_quota"
    assert answer.body()["error"]["code"] == "insufficient_quota"
    assert Reservation.objects.count() == 3


@pytest.mark.django_db
def test_settling_replaces_the_hold_with_the_actual_cost(user) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=ESTIMATE * 3)
    held = [admit(user) for _ in range(3)]
    # Each call used 100 of its 500 completion tokens: 1000 x 0.15 + 100 x 0.60 = 0.00021.
    for admission, request_id in held:
        settle(user, request_id, admission, completion=100)
    assert not Reservation.objects.exists()
    # Spent 0.00063 of 0.00135: room for one more worst case (0.00045), not two.
    admit(user)
    with pytest.raises(QuotaExceeded):
        admit(user)


@pytest.mark.django_db
def test_spend_beyond_the_estimate_blocks_the_next_call(user) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=ESTIMATE)
    admission, request_id = admit(user)
    settle(user, request_id, admission, completion=900)  # the upstream ran past our estimate
    with pytest.raises(QuotaExceeded) as raised:
        admit(user, prompt=1, completion=1)
    assert "$0.000000 of your monthly budget" in raised.value.message


@pytest.mark.django_db
def test_expired_holds_stop_counting_and_are_deleted(user) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=ESTIMATE)
    _, crashed = admit(user, at=NOW)  # its process died: never settled
    with pytest.raises(QuotaExceeded):
        admit(user, at=NOW + timedelta(seconds=10))
    later = NOW + timedelta(seconds=django_settings.BILLING_RESERVATION_TTL + 1)
    _, fresh = admit(user, at=later)
    assert list(Reservation.objects.values_list("request_id", flat=True)) == [fresh]


@pytest.mark.django_db
def test_a_daily_budget_resets_at_local_midnight_and_a_monthly_one_at_the_month(user, settings) -> None:
    settings.BILLING_TIME_ZONE = "Europe/Berlin"
    account_quota_set(user_id=user.pk, daily_spend_limit_usd=ESTIMATE, monthly_spend_limit_usd=ESTIMATE * 2)

    def admit_and_settle(at: datetime) -> None:
        admission, request_id = admit(user, at=at)
        settle(user, request_id, admission, completion=500, at=at)

    admit_and_settle(datetime(2025, 6, 15, 21, 59, tzinfo=UTC))  # 23:59 in Berlin
    with pytest.raises(QuotaExceeded) as daily:
        admit(user, at=datetime(2025, 6, 15, 21, 59, 59, tzinfo=UTC))
    assert "daily budget" in daily.value.message
    admit_and_settle(datetime(2025, 6, 15, 22, 0, tzinfo=UTC))  # midnight in Berlin: a new day
    with pytest.raises(QuotaExceeded) as monthly:
        admit(user, at=datetime(2025, 6, 20, tzinfo=UTC))
    assert "monthly budget" in monthly.value.message
    admit_and_settle(datetime(2025, 6, 30, 22, 0, tzinfo=UTC))  # 1 July in Berlin: a new month


@pytest.mark.django_db
def test_period_usage_is_this_users_day_and_month_and_this_accounts_live_holds(user, user_factory) -> None:
    other = user_factory()
    for payer in (user, other):
        account_quota_set(user_id=payer.pk, monthly_spend_limit_usd=D("100"))
    record_call(user, completion=500, at=NOW)  # 0.00045: today
    record_call(user, completion=1000, at=NOW - timedelta(days=3))  # 0.00075: earlier this month
    record_call(user, completion=2000, at=NOW - timedelta(days=31))  # last month: not counted
    record_call(other, completion=700, at=NOW)  # another user's day
    admit(user, completion=100, at=NOW - timedelta(seconds=django_settings.BILLING_RESERVATION_TTL + 1))  # expired
    admit(user, completion=300, at=NOW)  # live: 1000 x 0.15 + 300 x 0.60 per 1M = 0.00033
    admit(other, at=NOW)  # another account's hold

    usage = period_usage(account=Account.objects.get(user=user), at=NOW)

    assert usage == PeriodUsage(
        day_cost_usd=D("0.00045"),
        month_cost_usd=D("0.0012"),
        day_tokens=1500,
        month_tokens=3500,
        reserved_usd=D("0.00033"),
        reserved_tokens=1300,
    )


@pytest.mark.django_db
def test_token_budgets_count_prompt_and_completion_tokens(user) -> None:
    account_quota_set(user_id=user.pk, daily_token_limit=3000)
    admit(user)
    admit(user)
    with pytest.raises(QuotaExceeded) as raised:
        admit(user)
    assert raised.value.message == TOKEN_QUOTA_EXCEEDED.format(needed=1500, remaining=0, period="daily", limit=3000)


@pytest.mark.django_db
def test_a_soft_threshold_warns_before_the_hard_limit(user) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=D("0.001"), soft_threshold=D("0.8"))
    first, _ = admit(user)
    second, _ = admit(user)
    assert first.warning == ""
    assert second.warning == "monthly spend at 90% of $0.001000"


@pytest.mark.django_db
def test_accounts_without_limits_are_priced_but_hold_nothing(user) -> None:
    admission, _ = admit(user)
    assert (admission.reserved_usd, admission.reserved_tokens) == (None, None)
    assert admission.rates.input == D("0.15")
    assert Account.objects.filter(user=user).exists()  # created on demand
    assert not Reservation.objects.exists()


@pytest.mark.django_db
def test_a_call_refused_after_admission_gives_its_hold_back(user) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=ESTIMATE)
    _, request_id = admit(user)
    budget_release(request_id=request_id)
    assert not Reservation.objects.exists()
    admit(user)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"monthly_spend_limit_usd": D("-1")}, ValueError),
        ({"daily_token_limit": -5}, ValueError),
        ({"soft_threshold": D("1.5")}, ValueError),
        ({"soft_threshold": D("0")}, ValueError),
        ({"monthly_spend_limit_usd": 10.0}, TypeError),
    ],
    ids=["negative-budget", "negative-tokens", "threshold-over-one", "threshold-zero", "float-budget"],
)
def test_bad_quotas_are_refused(user, changes, error) -> None:
    with pytest.raises(error):
        account_quota_set(user_id=user.pk, **changes)


ADMITTERS = 20


@pytest.mark.django_db(transaction=True)
def test_concurrent_admissions_never_overcommit_a_budget(user) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=ESTIMATE * 5)
    start = threading.Barrier(ADMITTERS)

    def try_admit(_: int) -> bool:
        start.wait()
        try:
            admit(user, request_id=uuid.uuid4())
            return True
        except QuotaExceeded:
            return False
        finally:
            connection.close()

    with ThreadPoolExecutor(ADMITTERS) as pool:
        admitted = sum(pool.map(try_admit, range(ADMITTERS)))
    assert admitted == 5
    assert Reservation.objects.count() == 5
