"""The ledger: one immutable priced row per call, rolled up per user x model x day in the same
transaction, so ledger, rollups and a fresh SUM() agree exactly, however many write at once."""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from django.db import IntegrityError, connection

from billing.models import IMMUTABLE_RECORD, DailyUsage, Reservation, UsageRecord
from billing.money import money_sum
from billing.periods import billing_day
from billing.selectors import ledger_totals, rollup_totals

from .conftest import admit, rates_now, record_call

pytestmark = pytest.mark.ledger
D = Decimal


@pytest.mark.django_db
def test_a_call_is_one_priced_row_and_one_rollup_increment(user) -> None:
    record = record_call(user, model="gpt-4o-mini", prompt=1000, cached=200, completion=500)
    assert record.cost_usd == D("0.000435")
    assert (record.input_usd_per_1m, record.cached_input_usd_per_1m, record.output_usd_per_1m) == (D("0.15"), D("0.075"), D("0.60"))
    assert (record.price_multiplier, record.price_source) == (D(1), "catalog")
    rollup = DailyUsage.objects.get()
    assert (rollup.user_id, rollup.model, rollup.day) == (user.pk, "gpt-4o-mini", date(2025, 6, 15))
    assert (rollup.requests, rollup.prompt_tokens, rollup.cached_tokens, rollup.completion_tokens) == (1, 1000, 200, 500)
    assert rollup.cost_usd == D("0.000435")

    record_call(user, model="gpt-4o-mini", prompt=10, completion=20)
    rollup.refresh_from_db()
    assert (rollup.requests, rollup.prompt_tokens, rollup.completion_tokens) == (2, 1010, 520)
    assert rollup.cost_usd == D("0.000435") + D("0.0000135")


@pytest.mark.django_db
def test_rollup_days_are_calendar_days_in_the_billing_time_zone(user, settings) -> None:
    settings.BILLING_TIME_ZONE = "America/New_York"
    record_call(user, at=datetime(2025, 1, 1, 3, tzinfo=UTC))  # 22:00 on 31 December in New York
    record_call(user, at=datetime(2025, 1, 1, 6, tzinfo=UTC))  # 01:00 on 1 January
    assert sorted(DailyUsage.objects.values_list("day", "requests")) == [(date(2024, 12, 31), 1), (date(2025, 1, 1), 1)]


@pytest.mark.django_db
def test_ledger_rows_are_immutable(user) -> None:
    record = record_call(user)
    record.completion_tokens = 0
    with pytest.raises(ValueError, match=IMMUTABLE_RECORD):
        record.save()
    with pytest.raises(ValueError, match=IMMUTABLE_RECORD):
        record.delete()
    record.refresh_from_db()
    assert record.completion_tokens == 500


@pytest.mark.django_db
def test_recording_settles_the_hold_in_the_same_transaction(user) -> None:
    from billing.services import account_quota_set

    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=D("1"))
    admission, request_id = admit(user)
    assert Reservation.objects.filter(request_id=request_id).exists()
    record_call(user, request_id=request_id, rates=admission.rates)
    assert not Reservation.objects.exists()
    # A second write for the same call fails as a whole: no second rollup increment either.
    with pytest.raises(IntegrityError):
        record_call(user, request_id=request_id, rates=admission.rates)
    assert ledger_totals() == rollup_totals()
    assert rollup_totals().requests == 1


USERS, MODELS = 3, ("gpt-4o-mini", "gpt-4.1-nano", "o3")
DAYS = (datetime(2025, 6, 14, 23, 59, 59, 999999, tzinfo=UTC), datetime(2025, 6, 15, tzinfo=UTC), datetime(2025, 7, 1, 12, tzinfo=UTC))
WRITERS, CALLS_PER_WRITER = 12, 25


def _key(user_id: int, model: str, at: datetime) -> tuple[int, str, date]:
    return user_id, model, billing_day(at)


@pytest.mark.django_db(transaction=True)
def test_ledger_rollups_and_a_fresh_sum_agree_exactly_after_concurrent_writers(user_factory) -> None:
    users = [user_factory() for _ in range(USERS)]
    rates = {model: rates_now(users[0], model) for model in MODELS}
    start = threading.Barrier(WRITERS)

    def writer(seed: int) -> list[tuple[tuple[int, str, date], int, int, int, Decimal]]:
        rng = random.Random(seed)
        written = []
        start.wait()
        try:
            for _ in range(CALLS_PER_WRITER):
                user, model, at = rng.choice(users), rng.choice(MODELS), rng.choice(DAYS)
                prompt = rng.randrange(1, 50_000)
                cached = rng.randrange(0, prompt + 1)
                completion = rng.randrange(0, 20_000)
                record = record_call(user, model=model, prompt=prompt, cached=cached, completion=completion, at=at, rates=rates[model])
                written.append((_key(user.pk, model, at), prompt, cached, completion, record.cost_usd))
        finally:
            connection.close()
        return written

    with ThreadPoolExecutor(WRITERS) as pool:
        results = [row for rows in pool.map(writer, range(WRITERS)) for row in rows]

    expected: dict[tuple[int, str, date], list] = defaultdict(lambda: [0, 0, 0, 0, []])
    for key, prompt, cached, completion, cost in results:
        entry = expected[key]
        entry[0] += 1
        entry[1] += prompt
        entry[2] += cached
        entry[3] += completion
        entry[4].append(cost)
    rollups = {
        (row.user_id, row.model, row.day): (row.requests, row.prompt_tokens, row.cached_tokens, row.completion_tokens, row.cost_usd)
        for row in DailyUsage.objects.all()
    }
    assert rollups == {key: (n, p, c, o, money_sum(costs)) for key, (n, p, c, o, costs) in expected.items()}

    ledger, rolled = ledger_totals(), rollup_totals()
    assert ledger == rolled
    assert ledger.requests == WRITERS * CALLS_PER_WRITER == UsageRecord.objects.count()
    assert ledger.cost_usd == money_sum(cost for *_, cost in results)
    for user in users:
        assert ledger_totals(user_id=user.pk) == rollup_totals(user_id=user.pk)
    # Every row's cost is its snapshot rates applied to its tokens.
    for record in UsageRecord.objects.all():
        assert record.cost_usd == record.rates.cost(
            prompt_tokens=record.prompt_tokens, cached_tokens=record.cached_tokens, completion_tokens=record.completion_tokens
        )
