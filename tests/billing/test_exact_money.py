"""Money is exact on every database: no float on any path (`billing.fields.ExactDecimalField`).

Runs on PostgreSQL and on SQLite (`-m ledger`). On SQLite, Django's own `DecimalField` keeps REAL
values, adds REAL in `SUM()` and in the rollup upsert: the big test below fails there on it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import sqlite3
import subprocess
import sys
import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.db import connection, transaction

from billing.fields import ExactDecimalField
from billing.models import DailyUsage, PricingPlan, UsageRecord
from billing.money import FLOAT_REFUSED, Rates
from billing.periods import billing_day
from billing.selectors import ledger_totals, period_usage, rollup_totals
from billing.services import _daily_usage_add, account_get_or_create, usage_record_create

pytestmark = pytest.mark.ledger

CALLS = 30_000
THROUGH_SERVICE = 500  # of which written by `usage_record_create` itself, one transaction each
USERS = 25
MODELS = ("gpt-4o", "gpt-4o-mini", "o3", "sim-chat")
START = datetime(2025, 5, 20, tzinfo=UTC)
SPAN = timedelta(days=40)  # across a month end, so budgets see days and months
BULK = 5000


def _random_rates(pick: random.Random) -> Rates:
    """Rates with all their places used: USD per 1M tokens to 6 places, a multiplier to 4."""
    return Rates(
        input=Decimal(pick.randrange(0, 150_000_000)).scaleb(-6),
        cached_input=Decimal(pick.randrange(0, 75_000_000)).scaleb(-6),
        output=Decimal(pick.randrange(0, 600_000_000)).scaleb(-6),
        multiplier=Decimal(pick.randrange(5_000, 25_000)).scaleb(-4),
        source=pick.choice(("catalog", "plan", "account")),
    )


def _random_call(pick: random.Random, users: list[Any]) -> dict[str, Any]:
    prompt = pick.randrange(0, 1_000_000)  # up to a 1M-token context
    cached = pick.randrange(0, prompt + 1) if pick.random() < 0.3 else 0
    completion = pick.randrange(0, 100_000)
    return {
        "user": pick.choice(users),
        "model": pick.choice(MODELS),
        "request_id": uuid.UUID(int=pick.getrandbits(128), version=4),
        "created_at": START + timedelta(microseconds=pick.randrange(int(SPAN.total_seconds() * 1_000_000))),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": completion,
        "rates": _random_rates(pick),
    }


def _ledger_values(call: dict[str, Any]) -> dict[str, Any]:
    """A ledger row's values by attribute name, as `usage_record_create` would write them."""
    rates: Rates = call["rates"]
    return {
        "request_id": call["request_id"],
        "user_id": call["user"].pk,
        "api_key_id": None,
        "model": call["model"],
        "requested_model": "",
        "call_id": call["request_id"],
        "attempt": 1,
        "endpoint": UsageRecord.Endpoint.CHAT_COMPLETIONS,
        "upstream_id": "",
        "upstream_model": call["model"],
        "provider": "openai",
        "stream": True,
        "status": "completed",
        "error_kind": "",
        "prompt_tokens": call["prompt_tokens"],
        "completion_tokens": call["completion_tokens"],
        "cached_tokens": call["cached_tokens"],
        "reasoning_tokens": 0,
        "token_source": "upstream",
        "ttft_us": None,
        "duration_us": 1,
        "created_at": call["created_at"],
        "cost_usd": call["cost"],
        "input_usd_per_1m": rates.input,
        "cached_input_usd_per_1m": rates.cached_input,
        "output_usd_per_1m": rates.output,
        "price_multiplier": rates.multiplier,
        "price_source": rates.source,
        "reserved_usd": call["cost"] * 2,
    }


def _ledger_insert(calls: list[dict[str, Any]]) -> None:
    """Insert ledger rows in bulk, as the values each field itself prepares (`get_db_prep_save`,
    as `bulk_create` does, without the ORM's per-row cost): COPY on PostgreSQL, executemany on SQLite."""
    fields = [field for field in UsageRecord._meta.concrete_fields if not field.primary_key]
    quote = connection.ops.quote_name
    table = quote(UsageRecord._meta.db_table)
    columns = ", ".join(quote(field.column) for field in fields)
    for start in range(0, len(calls), BULK):
        rows = []
        for call in calls[start : start + BULK]:
            values = _ledger_values(call)
            rows.append([field.get_db_prep_save(values[field.attname], connection) for field in fields])
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
            else:
                cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({', '.join(['%s'] * len(fields))})", rows)


def _export(*args: str) -> str:
    out = io.StringIO()
    call_command("export_costs", *args, "--totals", "--no-progress", stdout=out)
    return out.getvalue()


def test_thirty_thousand_random_costs_add_up_to_the_last_digit_in_ledger_rollups_and_exports(
    django_user_model: Any, settings: Any
) -> None:
    settings.BILLING_TIME_ZONE = "America/New_York"  # local days that are not UTC days
    pick = random.Random(20261201)
    users = [django_user_model.objects.create(username=f"exact-{index}") for index in range(USERS)]
    calls = [_random_call(pick, users) for _ in range(CALLS)]
    for call in calls:
        call["cost"] = call["rates"].cost(
            prompt_tokens=call["prompt_tokens"], cached_tokens=call["cached_tokens"], completion_tokens=call["completion_tokens"]
        )
    # Costs use all ten places and up to 13 significant digits; their sum needs more than a float holds.
    expected = sum((call["cost"] for call in calls), Decimal(0))
    assert expected == expected.quantize(Decimal("1e-10")) and len(expected.as_tuple().digits) > 16

    # Most rows in bulk, each added to its rollup by the gateway's own upsert ...
    bulk, through_service = calls[THROUGH_SERVICE:], calls[:THROUGH_SERVICE]
    _ledger_insert(bulk)
    for call in bulk:
        _daily_usage_add(
            user_id=call["user"].pk,
            model=call["model"],
            day=billing_day(call["created_at"]),
            prompt_tokens=call["prompt_tokens"],
            completion_tokens=call["completion_tokens"],
            cached_tokens=call["cached_tokens"],
            cost_usd=call["cost"],
        )
    # ... and some through the whole ledger service (ledger row, rollup, settle), as a call ends.
    for call in through_service:
        record = usage_record_create(
            request_id=call["request_id"], user_id=call["user"].pk, api_key_id=None, model=call["model"],
            upstream_model=call["model"], provider="openai", stream=True, status="completed", error_kind="",
            prompt_tokens=call["prompt_tokens"], completion_tokens=call["completion_tokens"],
            cached_tokens=call["cached_tokens"], reasoning_tokens=0, token_source="upstream", ttft_us=None,
            duration_us=1, created_at=call["created_at"], rates=call["rates"],
        )
        assert record.cost_usd == call["cost"]

    # Each stored row reads back exactly as written: its cost and the rates it was billed at.
    stored = UsageRecord.objects.order_by("created_at", "id").values_list(
        "created_at", "cost_usd", "input_usd_per_1m", "cached_input_usd_per_1m", "output_usd_per_1m", "price_multiplier"
    )
    written = sorted(
        (call["created_at"], call["cost"], call["rates"].input, call["rates"].cached_input, call["rates"].output, call["rates"].multiplier)
        for call in calls
    )
    assert len(stored) == CALLS
    assert sorted(stored) == written

    # The database's SUM() of the ledger and of the rollups, to the last digit.
    assert ledger_totals().cost_usd == expected
    assert rollup_totals().cost_usd == expected
    assert rollup_totals().requests == CALLS

    # Every rollup row (user x model x local day) is the exact sum of its calls.
    by_group: dict[tuple[int, str, date], Decimal] = defaultdict(Decimal)
    for call in calls:
        by_group[call["user"].pk, call["model"], billing_day(call["created_at"])] += call["cost"]
    assert dict(((row.user_id, row.model, row.day), row.cost_usd) for row in DailyUsage.objects.all()) == by_group

    # Budgets read the same sums: a user's day and month, from the rollups in one statement.
    user, at = users[0], START + timedelta(days=12, hours=5)
    usage = period_usage(account=account_get_or_create(user_id=user.pk), at=at)
    day, month = billing_day(at), billing_day(at).replace(day=1)
    mine = [(billing_day(call["created_at"]), call["cost"]) for call in calls if call["user"] == user]
    assert usage.day_cost_usd == sum((cost for local, cost in mine if local == day), Decimal(0))
    assert usage.month_cost_usd == sum((cost for local, cost in mine if local.replace(day=1) == month), Decimal(0))

    # The exports' totals rows: every ledger row (raw), and the rollups grouped by user and day.
    raw = _export("--format", "jsonl").splitlines()
    assert len(raw) == CALLS + 1
    assert Decimal(json.loads(raw[-1])["totals"]["cost_usd"]) == expected
    grouped = list(csv.reader(io.StringIO(_export("--group-by", "user", "--group-by", "day", "--format", "csv"))))
    header, rows, totals = grouped[0], grouped[1:-1], grouped[-1]
    cost = header.index("cost_usd")
    assert totals[0] == "total" and Decimal(totals[cost]) == expected
    assert sum((Decimal(row[cost]) for row in rows), Decimal(0)) == expected
    # Money is written at the stored precision, never through a float or an exponent.
    assert totals[cost] == format(expected, "f") and all(len(row[cost].split(".")[1]) == 10 for row in rows)


# --- The field itself ---------------------------------------------------------------------------


def _plan(multiplier: Any) -> PricingPlan:
    return PricingPlan.objects.create(name=f"plan-{uuid.uuid4().hex[:8]}", multiplier=multiplier)


@pytest.mark.parametrize(
    "value",
    ["0.1000000001", "0.0000000001", "922337203.6854775807", "12345.6789012345", "0.3000000000", "7"],
    ids=["tenth-and-a-quantum", "one-quantum", "sqlite-limit", "fifteen-digits", "trailing-zeros", "whole"],
)
def test_a_cost_round_trips_exactly(db: None, user: Any, value: str) -> None:
    account = account_get_or_create(user_id=user.pk)
    account.monthly_spend_limit_usd = Decimal(value)
    account.save()
    account.refresh_from_db()
    assert account.monthly_spend_limit_usd == Decimal(value)
    assert format(account.monthly_spend_limit_usd, "f") == format(Decimal(value).quantize(Decimal("1e-10")), "f")
    # Compared in the database, at the column's scale: a lookup is scaled like a stored value.
    assert type(account).objects.filter(pk=account.pk, monthly_spend_limit_usd=Decimal(value)).exists()
    assert not type(account).objects.filter(pk=account.pk, monthly_spend_limit_usd__gt=Decimal(value)).exists()


@pytest.mark.skipif(connection.vendor != "sqlite", reason="PostgreSQL keeps numeric(20, 10), as DecimalField does")
def test_sqlite_stores_the_scaled_integer(db: None, user: Any) -> None:
    account = account_get_or_create(user_id=user.pk)
    type(account).objects.filter(pk=account.pk).update(daily_spend_limit_usd=Decimal("0.1000000001"))
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT daily_spend_limit_usd, typeof(daily_spend_limit_usd) FROM billing_account WHERE id = %s", [account.pk]
        )
        assert cursor.fetchone() == (1_000_000_001, "integer")


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (Decimal("0.12345678901"), ValueError),  # 11 places in a 10-place column: never rounded
        (Decimal("10000000000"), ValueError),  # 11 integer digits in a 20, 10 column
        (0.1, TypeError),  # a float, not money
    ],
    ids=["too-many-places", "too-many-digits", "float"],
)
def test_a_value_the_column_cannot_hold_exactly_is_refused(db: None, user: Any, value: Any, error: type[Exception]) -> None:
    account = account_get_or_create(user_id=user.pk)
    account.monthly_spend_limit_usd = value
    with pytest.raises(error) as raised, transaction.atomic():
        account.save()
    if error is TypeError:
        assert str(raised.value) == FLOAT_REFUSED.format(value=value)
    account.refresh_from_db()
    assert account.monthly_spend_limit_usd is None


def test_a_multiplier_with_more_places_than_four_is_refused_not_rounded(db: None) -> None:
    with pytest.raises(ValueError, match="more than 4 decimal places"), transaction.atomic():
        _plan(Decimal("1.23456"))
    assert _plan(Decimal("1.2345")).multiplier == Decimal("1.2345")


def test_past_sqlite_int64_a_value_is_refused_there() -> None:
    field = ExactDecimalField(max_digits=24, decimal_places=10)
    past = Decimal("922337203.6854775808")
    if connection.vendor == "sqlite":
        with pytest.raises(ValueError, match="outside what SQLite stores exactly"):
            field.get_db_prep_save(past, connection)
    else:
        assert field.get_db_prep_save(past, connection) == past


def test_a_float_is_refused_by_forms_and_full_clean_too() -> None:
    field = ExactDecimalField(max_digits=20, decimal_places=10)
    with pytest.raises(ValidationError):
        field.clean(0.5, None)
    assert field.clean("0.5", None) == Decimal("0.5")


def test_a_float_read_back_is_an_error_not_a_guess() -> None:
    field = ExactDecimalField(max_digits=20, decimal_places=10)
    with pytest.raises(TypeError, match="got 0.1"):
        field.from_db_value(0.1, None, connection)


# --- The migration of an existing SQLite database ----------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
DRIFT_CALLS = 20_000
DRIFT_COST = "7.1234567891"  # x 20,000: USD 142,469.135782, six integer digits, so a REAL sum of
# them, read back to 15 significant digits, has lost its tenth place


def _manage(database: Path, *args: str) -> None:
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{database}", "BILLING_TIME_ZONE": "UTC"}
    subprocess.run([sys.executable, "manage.py", *args, "-v", "0"], cwd=ROOT, env=env, check=True, timeout=120)


@pytest.mark.skipif(connection.vendor != "sqlite", reason="runs once, in the SQLite pass (it migrates its own SQLite file)")
def test_migrating_an_sqlite_database_turns_its_real_values_into_exact_scaled_integers(tmp_path: Path) -> None:
    database = tmp_path / "before.sqlite3"
    _manage(database, "migrate", "auth")
    _manage(database, "migrate", "billing", "0002")
    # Values as Django's DecimalField left them on SQLite: REAL, and a rollup summed in REAL.
    with sqlite3.connect(database) as db:
        user = db.execute(
            "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, is_staff, is_active,"
            " date_joined) VALUES ('', 0, 'before', '', '', '', 0, 1, '2025-01-01 00:00:00')"
        ).lastrowid
        db.execute(
            "INSERT INTO billing_price (model, input_usd_per_1m, cached_input_usd_per_1m, output_usd_per_1m, effective_from,"
            " created_at, note) VALUES ('m', '1.234567', NULL, '10', '2020-01-01 00:00:00', '2020-01-01 00:00:00', '')"
        )
        db.execute("INSERT INTO billing_pricingplan (name, multiplier, description) VALUES ('gold', '1.2', '')")
        db.execute(
            "INSERT INTO billing_account (user_id, plan_id, monthly_spend_limit_usd, soft_threshold, created_at, updated_at)"
            " VALUES (?, 1, '12345.6789012345', '0.8', '2020-01-01 00:00:00', '2020-01-01 00:00:00')",
            (user,),
        )
        db.execute(
            "INSERT INTO billing_dailyusage (user_id, model, day, requests, prompt_tokens, completion_tokens, cached_tokens,"
            " cost_usd) VALUES (?, 'm', '2025-06-01', 0, 0, 0, 0, 0), (?, 'gone', '2025-06-02', 1, 0, 0, 0, '0.1000000001')",
            (user, user),
        )
        for index in range(DRIFT_CALLS):
            db.execute(
                "INSERT INTO billing_usagerecord (request_id, user_id, model, upstream_model, provider, stream, status,"
                " error_kind, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, token_source, duration_us,"
                " created_at, cost_usd, input_usd_per_1m, cached_input_usd_per_1m, output_usd_per_1m, price_multiplier,"
                " price_source) VALUES (?, ?, 'm', 'm', 'openai', 1, 'completed', '', 10, 5, 0, 0, 'upstream', 1,"
                " '2025-06-01 12:00:00', ?, '1.234567', '1.234567', '10', '1.2', 'catalog')",
                (uuid.UUID(int=index).hex, user, DRIFT_COST),
            )
            db.execute(
                "UPDATE billing_dailyusage SET requests = requests + 1, prompt_tokens = prompt_tokens + 10,"
                " completion_tokens = completion_tokens + 5, cost_usd = cost_usd + ? WHERE model = 'm'",
                (DRIFT_COST,),
            )
        (float_sum,) = db.execute("SELECT cost_usd FROM billing_dailyusage WHERE model = 'm'").fetchone()
    exact_sum = Decimal(DRIFT_COST) * DRIFT_CALLS
    assert Context(prec=15).create_decimal_from_float(float_sum).quantize(Decimal("1e-10")) != exact_sum

    _manage(database, "migrate", "billing")

    with sqlite3.connect(database) as db:
        def column(sql: str) -> list[tuple[Any, ...]]:
            return db.execute(sql).fetchall()

        assert column("SELECT input_usd_per_1m, cached_input_usd_per_1m, output_usd_per_1m FROM billing_price WHERE model = 'm'") == [
            (1_234_567, None, 10_000_000)
        ]
        assert column("SELECT multiplier FROM billing_pricingplan") == [(12_000,)]
        assert column("SELECT monthly_spend_limit_usd, soft_threshold FROM billing_account") == [(123_456_789_012_345, 800)]
        assert column(
            "SELECT DISTINCT cost_usd, input_usd_per_1m, output_usd_per_1m, price_multiplier, typeof(cost_usd)"
            " FROM billing_usagerecord"
        ) == [(71_234_567_891, 1_234_567, 10_000_000, 12_000, "integer")]
        # The rollup is its calls' exact sum again; one whose calls are gone keeps its own value.
        assert column("SELECT model, cost_usd, requests FROM billing_dailyusage ORDER BY model") == [
            ("gone", 1_000_000_001, 1),
            ("m", int(exact_sum.scaleb(10)), DRIFT_CALLS),
        ]
