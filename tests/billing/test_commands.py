"""`manage.py importprices` and `manage.py setquota`: idempotent, exact, and precise about bad input."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from billing.models import Account, Price, PricingPlan

pytestmark = [pytest.mark.django_db, pytest.mark.ledger]
D = Decimal


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_with_no_file_the_default_catalog_is_loaded_idempotently() -> None:
    Price.objects.all().delete()
    assert run("importprices") == "prices.json: 17 price(s): 17 added, 0 unchanged.\n"
    assert run("importprices") == "prices.json: 17 price(s): 0 added, 17 unchanged.\n"
    assert Price.objects.count() == 17


def test_a_json_file_with_plain_numbers_is_read_exactly(tmp_path) -> None:
    path = write(tmp_path, "new.json", """[
  {"model": "gpt-4o-mini", "input_usd_per_1m": 0.1, "cached_input_usd_per_1m": 0.05, "output_usd_per_1m": 0.3,
   "effective_from": "2025-07-01T00:00:00+02:00"}
]""")
    assert run("importprices", str(path)) == "new.json: 1 price(s): 1 added, 0 unchanged.\n"
    price = Price.objects.get(model="gpt-4o-mini", effective_from=datetime(2025, 6, 30, 22, tzinfo=UTC))
    assert (price.input_usd_per_1m, price.cached_input_usd_per_1m, price.output_usd_per_1m) == (D("0.1"), D("0.05"), D("0.3"))


def test_a_csv_file_is_read_and_an_empty_cached_rate_means_none(tmp_path) -> None:
    path = write(tmp_path, "new.csv", (
        "model,input_usd_per_1m,cached_input_usd_per_1m,output_usd_per_1m,effective_from,note\n"
        "house-a,1.25,,5.00,2025-01-01T00:00:00Z,first\n"
        "\n"
        "house-b,0.333333,0.111111,1,2025-01-01T00:00:00Z,\n"
    ))
    assert run("importprices", str(path)) == "new.csv: 2 price(s): 2 added, 0 unchanged.\n"
    a, b = Price.objects.get(model="house-a"), Price.objects.get(model="house-b")
    assert (a.cached_input_usd_per_1m, a.note) == (None, "first")
    assert b.input_usd_per_1m == D("0.333333")


ROW = '{"model": "m", "input_usd_per_1m": "1", "output_usd_per_1m": "2", "effective_from": "2025-01-01T00:00:00Z"}'
HEADER = "model,input_usd_per_1m,cached_input_usd_per_1m,output_usd_per_1m,effective_from\n"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.json", '[\n  ' + ROW + ',\n  {"model": "x", "input_usd_per_1m": "1", "effective_from": "2025-01-01T00:00:00Z"}\n]',
         "p.json line 3: missing field 'output_usd_per_1m'."),
        ("p.json", '[\n  {"model": "m", "input_usd_per_1m": "abc", "output_usd_per_1m": "2", "effective_from": "2025-01-01T00:00:00Z"}\n]',
         "p.json line 2: 'input_usd_per_1m' must be a non-negative decimal amount (USD per 1M tokens), got 'abc'."),
        ("p.json", '[{"model": "m", "input_usd_per_1m": "0.1234567", "output_usd_per_1m": "2", "effective_from": "2025-01-01T00:00:00Z"}]',
         "p.json line 1: 'input_usd_per_1m' must be a non-negative decimal amount (USD per 1M tokens), got '0.1234567'."),
        ("p.json", '[{"model": "m", "input_usd_per_1m": "-1", "output_usd_per_1m": "2", "effective_from": "2025-01-01T00:00:00Z"}]',
         "p.json line 1: 'input_usd_per_1m' must be a non-negative decimal amount (USD per 1M tokens), got '-1'."),
        ("p.json", '[{"model": "m", "input_usd_per_1m": "1", "output_usd_per_1m": "2", "effective_from": "2025-01-01"}]',
         "p.json line 1: 'effective_from' must be an ISO 8601 datetime with a time zone, got '2025-01-01'."),
        ("p.json", '[' + ROW[:-1] + ', "ouput_usd_per_1m": "2"}]',
         "p.json line 1: unknown field 'ouput_usd_per_1m' (expected: model, input_usd_per_1m, output_usd_per_1m, effective_from, cached_input_usd_per_1m, note)."),
        ("p.json", '[\n  ' + ROW + ',\n  {"model": oops}\n]', "p.json line 3: invalid JSON: Expecting value."),
        ("p.json", '{"prices": []}', "p.json line 1: expected a JSON array of price objects."),
        ("p.json", '[\n ' + ROW + ',\n ' + ROW + '\n]', "p.json line 3: a second price for m effective 2025-01-01T00:00:00+00:00 (first on line 2)."),
        ("p.csv", "model,input_usd_per_1m,effective_from\nm,1,2025-01-01T00:00:00Z\n", "p.csv line 1: the header lacks column(s) output_usd_per_1m."),
        ("p.csv", HEADER + "m,1,,2,2025-01-01T00:00:00Z\nn,1,,two,2025-01-01T00:00:00Z\n",
         "p.csv line 3: 'output_usd_per_1m' must be a non-negative decimal amount (USD per 1M tokens), got 'two'."),
        ("p.txt", "whatever", "p.txt: unknown price file format; use a .json or .csv file."),
    ],
    ids=[
        "json-missing-field", "json-bad-rate", "json-too-many-places", "json-negative", "json-naive-date",
        "json-unknown-field", "json-syntax", "json-not-an-array", "json-duplicate", "csv-missing-column",
        "csv-bad-rate", "unknown-format",
    ],
)
def test_a_bad_file_is_refused_naming_the_line_and_imports_nothing(tmp_path, name, text, message) -> None:
    before = Price.objects.count()
    with pytest.raises(CommandError) as raised:
        run("importprices", str(write(tmp_path, name, text)))
    assert str(raised.value) == message
    assert Price.objects.count() == before


def test_a_row_that_would_rewrite_a_price_is_refused_unless_kept(tmp_path) -> None:
    path = write(tmp_path, "p.csv", HEADER + "new-model,1,,1,2025-01-01T00:00:00Z\ngpt-4o,9,,9,2024-01-01T00:00:00Z\n")
    with pytest.raises(CommandError) as raised:
        run("importprices", str(path))
    assert str(raised.value) == (
        "p.csv line 3: gpt-4o already has a price effective 2024-01-01T00:00:00+00:00 with other rates. "
        "Prices are history: add a row with a later effective_from instead."
    )
    assert not Price.objects.filter(model="new-model").exists()  # all or nothing
    assert run("importprices", str(path), "--keep-existing") == "p.csv: 2 price(s): 1 added, 0 unchanged, 1 kept as they were.\n"
    assert Price.objects.get(model="gpt-4o").input_usd_per_1m == D("2.50")


def test_setquota_sets_plan_and_budgets_exactly_and_none_clears(django_user_model) -> None:
    django_user_model.objects.create(username="ops")
    PricingPlan.objects.create(name="gold", multiplier=D("0.9"))
    out = run("setquota", "ops", "--plan", "gold", "--monthly-budget", "12.345", "--daily-budget", "0.10",
              "--monthly-tokens", "1000000", "--soft-threshold", "0.75")
    account = Account.objects.get(user__username="ops")
    assert account.plan.name == "gold"
    assert account.monthly_spend_limit_usd == D("12.345") and account.daily_spend_limit_usd == D("0.1")
    assert (account.monthly_token_limit, account.daily_token_limit, account.soft_threshold) == (1_000_000, None, D("0.75"))
    assert out.startswith("ops: plan gold; monthly 12.3450000000 USD / 1000000 tokens;")
    run("setquota", "ops", "--monthly-budget", "none", "--plan", "none")
    account.refresh_from_db()
    assert (account.plan, account.monthly_spend_limit_usd, account.daily_spend_limit_usd) == (None, None, D("0.1"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nobody",), "No user named 'nobody'."),
        (("ops", "--plan", "platinum"), "No pricing plan named 'platinum' (plans: none defined)."),
        (("ops", "--monthly-budget", "ten"), "--monthly-budget must be a USD amount such as 25 or 12.50 (or 'none'), got 'ten'."),
        (("ops", "--daily-budget", "-1"), "--daily-budget must not be negative, got '-1'."),
        (("ops", "--daily-tokens", "1.5"), "--daily-tokens must be a whole number of tokens (or 'none'), got '1.5'."),
        (("ops", "--soft-threshold", "1.5"), "--soft-threshold must be a fraction above 0 and at most 1, got '1.5'."),
        (("ops", "--monthly-budget", "1e12"), "Ensure that there are no more than 10 digits before the decimal point."),
    ],
    ids=["unknown-user", "unknown-plan", "budget-not-a-number", "negative-budget", "fractional-tokens", "threshold-over-one", "budget-too-large"],
)
def test_setquota_refuses_bad_input(django_user_model, args, message) -> None:
    django_user_model.objects.create(username="ops")
    with pytest.raises(CommandError) as raised:
        run("setquota", *args)
    assert str(raised.value) == message
