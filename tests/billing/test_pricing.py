"""Which price a call pays: the catalog in effect, plan multiplier, plan and account overrides."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billing.exceptions import PriceMissing
from billing.models import (
    AccountPrice,
    DailyUsage,
    PlanPrice,
    Price,
    PricingPlan,
    Reservation,
    UsageRecord,
)
from billing.money import Rates
from billing.selectors import rates_for
from billing.services import PRICE_MISSING, account_get_or_create, account_quota_set, budget_reserve
from llmgateway.errors import api_error_for
from streaming.catalog import environment_catalog

from .conftest import NOW, record_call

pytestmark = [pytest.mark.django_db, pytest.mark.ledger]
D = Decimal


CATALOG = [
    ("gpt-4o", "2.50", "1.25", "10.00"),
    ("gpt-4o-mini", "0.15", "0.075", "0.60"),
    ("gpt-4.1", "2.00", "0.50", "8.00"),
    ("gpt-4.1-mini", "0.40", "0.10", "1.60"),
    ("gpt-4.1-nano", "0.10", "0.025", "0.40"),
    ("o4-mini", "1.10", "0.275", "4.40"),
    ("o3", "2.00", "0.50", "8.00"),
    ("o3-mini", "1.10", "0.55", "4.40"),
    ("gpt-4-turbo", "10", None, "30"),
    ("gpt-3.5-turbo", "0.50", None, "1.50"),
    ("sim-chat", "1.00", "0.50", "2.00"),
    ("sim-fast", "1.00", "0.50", "2.00"),
    ("sim-long", "1.00", "0.50", "2.00"),
    ("text-embedding-3-small", "0.02", None, "0"),
    ("text-embedding-3-large", "0.13", None, "0"),
    ("text-embedding-ada-002", "0.10", None, "0"),
    ("sim-embed", "1.00", None, "0"),
]


@pytest.mark.parametrize(("model", "input", "cached", "output"), CATALOG, ids=[row[0] for row in CATALOG])
def test_a_fresh_database_has_the_default_catalog(model, input, cached, output) -> None:
    price = Price.objects.get(model=model)
    assert price.input_usd_per_1m == D(input)
    assert price.cached_input_usd_per_1m == (None if cached is None else D(cached))
    assert price.output_usd_per_1m == D(output)


def test_every_model_the_gateway_ships_has_a_price() -> None:
    priced = set(Price.objects.values_list("model", flat=True))
    assert set(environment_catalog().routes) <= priced


def test_a_model_without_a_cached_price_bills_cached_tokens_at_the_input_rate(user) -> None:
    record = record_call(user, model="gpt-4-turbo", prompt=1000, cached=400, completion=100)
    assert record.cached_input_usd_per_1m == D("10")
    assert record.cost_usd == D("0.013")


@pytest.mark.parametrize(
    ("model", "cost"),
    [("text-embedding-3-small", "0.02"), ("text-embedding-3-large", "0.13"), ("text-embedding-ada-002", "0.10"), ("sim-embed", "1")],
)
def test_an_embedding_call_pays_its_input_tokens_at_list_price(user, model, cost) -> None:
    record = record_call(user, model=model, prompt=1_000_000, completion=0, endpoint=UsageRecord.Endpoint.EMBEDDINGS)
    assert (record.endpoint, record.cost_usd, record.output_usd_per_1m) == ("embeddings", D(cost), D(0))
    rollup = DailyUsage.objects.get(user=user)
    assert (rollup.model, rollup.endpoint, rollup.requests, rollup.cost_usd) == (model, "embeddings", 1, D(cost))


def _setup(user, case: str) -> None:
    account = account_get_or_create(user_id=user.pk)
    plan = PricingPlan.objects.create(name="partner", multiplier=D("0.8"))
    if case != "catalog":
        account_quota_set(user_id=user.pk, plan=plan)
    if case in {"plan-override", "account-override"}:
        PlanPrice.objects.create(plan=plan, model="gpt-4o-mini", input_usd_per_1m=D("0.12"), cached_input_usd_per_1m=None, output_usd_per_1m=D("0.50"))
    if case == "account-override":
        AccountPrice.objects.create(account=account, model="gpt-4o-mini", input_usd_per_1m=D("0.10"), cached_input_usd_per_1m=D("0.01"), output_usd_per_1m=D("0.40"))


@pytest.mark.parametrize(
    ("case", "expected_rates", "expected_cost"),
    [
        # 1000 prompt (200 cached) + 500 completion at 0.15 / 0.075 / 0.60 = 0.000435
        ("catalog", Rates(input=D("0.15"), cached_input=D("0.075"), output=D("0.60"), multiplier=D(1), source="catalog"), D("0.000435")),
        ("plan-multiplier", Rates(input=D("0.15"), cached_input=D("0.075"), output=D("0.60"), multiplier=D("0.8"), source="catalog"), D("0.000348")),
        # Overrides are final: the plan's 0.8 does not apply to them.
        ("plan-override", Rates(input=D("0.12"), cached_input=D("0.12"), output=D("0.50"), multiplier=D(1), source="plan"), D("0.00037")),
        ("account-override", Rates(input=D("0.10"), cached_input=D("0.01"), output=D("0.40"), multiplier=D(1), source="account"), D("0.000282")),
    ],
    ids=["catalog", "plan-multiplier", "plan-override", "account-override"],
)
def test_the_most_specific_price_wins(user, case, expected_rates, expected_cost) -> None:
    _setup(user, case)
    rates = rates_for(account=account_get_or_create(user_id=user.pk), model="gpt-4o-mini", at=NOW)
    assert rates == expected_rates
    record = record_call(user, prompt=1000, cached=200, completion=500, rates=rates)
    assert record.cost_usd == expected_cost
    assert (record.input_usd_per_1m, record.cached_input_usd_per_1m, record.output_usd_per_1m) == (
        expected_rates.input, expected_rates.cached_input, expected_rates.output,
    )
    assert (record.price_multiplier, record.price_source) == (expected_rates.multiplier, expected_rates.source)


def test_an_alias_pays_its_upstream_models_price_unless_priced_itself(user) -> None:
    account = account_get_or_create(user_id=user.pk)
    inherited = rates_for(account=account, model="house-model", upstream_model="gpt-4o", at=NOW)
    assert inherited is not None and inherited.input == D("2.50")
    Price.objects.create(model="house-model", input_usd_per_1m=D("3"), output_usd_per_1m=D("12"), effective_from=datetime(2024, 6, 1, tzinfo=UTC))
    own = rates_for(account=account, model="house-model", upstream_model="gpt-4o", at=NOW)
    assert own is not None and (own.input, own.cached_input, own.output) == (D("3"), D("3"), D("12"))


def test_a_price_change_mid_month_leaves_earlier_rows_untouched(user) -> None:
    before = record_call(user, model="gpt-4o", prompt=1000, completion=1000, at=datetime(2025, 6, 10, tzinfo=UTC))
    Price.objects.create(
        model="gpt-4o", input_usd_per_1m=D("5.00"), cached_input_usd_per_1m=D("2.50"), output_usd_per_1m=D("20.00"),
        effective_from=datetime(2025, 6, 15, tzinfo=UTC),
    )
    after = record_call(user, model="gpt-4o", prompt=1000, completion=1000, at=datetime(2025, 6, 20, tzinfo=UTC))
    late = record_call(user, model="gpt-4o", prompt=1000, completion=1000, at=datetime(2025, 6, 11, tzinfo=UTC))

    before.refresh_from_db()
    assert before.cost_usd == D("0.0125")  # 1000 x 2.50 + 1000 x 10.00 per 1M
    assert before.input_usd_per_1m == D("2.50")
    assert after.cost_usd == D("0.025")
    # The price in effect is chosen by when the call started, not when it was recorded.
    assert late.cost_usd == D("0.0125")
    assert sorted(UsageRecord.objects.values_list("cost_usd", flat=True)) == [D("0.0125"), D("0.0125"), D("0.025")]


def test_an_unpriced_model_is_a_configuration_error_and_holds_nothing(user) -> None:
    account_quota_set(user_id=user.pk, monthly_spend_limit_usd=D("10"))
    with pytest.raises(PriceMissing) as raised:
        budget_reserve(
            user_id=user.pk, model="mystery-model", upstream_model="mystery-upstream", prompt_tokens=10,
            completion_tokens=10, request_id=uuid.uuid4(), now=NOW,
        )
    assert raised.value.message == PRICE_MISSING.format(model="mystery-model")
    answer = api_error_for(raised.value)
    assert answer is not None and answer.status == 500 and answer.code == "gateway_misconfigured"
    assert not Reservation.objects.exists()
    assert not UsageRecord.objects.exists()


def test_a_catalog_price_not_yet_in_effect_is_not_used(user) -> None:
    Price.objects.create(model="future-model", input_usd_per_1m=D("1"), output_usd_per_1m=D("1"), effective_from=datetime(2030, 1, 1, tzinfo=UTC))
    assert rates_for(account=account_get_or_create(user_id=user.pk), model="future-model", at=NOW) is None
