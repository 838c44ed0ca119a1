"""Reads: which price a call pays, how much of a budget is used, ledger and rollup totals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import (
    Count,
    Model,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce

from billing._sql import _column, _field, array_parameter, hot_cursor
from billing.fields import ExactDecimalField
from billing.models import (
    TOTAL_DIGITS,
    Account,
    AccountPrice,
    DailyUsage,
    PlanPrice,
    Price,
    Reservation,
    UsageRecord,
)
from billing.money import Rates
from billing.periods import period_containing

# Sums read back through the column's own type: exact on SQLite too (see billing.fields).
_MONEY = ExactDecimalField(**TOTAL_DIGITS)


def _price_names(model: str, upstream_model: str | None) -> list[str]:
    """The names a model's price is looked up by, most specific first."""
    return [model] if not upstream_model or upstream_model == model else [model, upstream_model]


def _first_by_name[T: (AccountPrice, PlanPrice, Price)](rows: Sequence[T], names: Sequence[str]) -> T | None:
    for name in names:
        for row in rows:
            if row.model == name:
                return row
    return None


def price_in_effect(*, model: str, at: datetime, upstream_model: str | None = None) -> Price | None:
    """The catalog price in effect at `at`: the latest `effective_from` not after it."""
    names = _price_names(model, upstream_model)
    rows = []
    for name in names:
        price = Price.objects.filter(model=name, effective_from__lte=at).order_by("-effective_from").first()
        if price is not None:
            rows.append(price)
    return _first_by_name(rows, names)


def rates_for(*, account: Account, model: str, at: datetime, upstream_model: str | None = None) -> Rates | None:
    """The rates `account` pays for `model` at `at`, by the rule in `billing.models`; None if unpriced.

    Account override > plan override (both final) > catalog price x plan multiplier.
    """
    names = _price_names(model, upstream_model)
    override = _first_by_name(list(AccountPrice.objects.filter(account=account, model__in=names)), names)
    if override is not None:
        return override.rates(source="account")
    plan = account.plan
    if plan is not None:
        plan_price = _first_by_name(list(PlanPrice.objects.filter(plan=plan, model__in=names)), names)
        if plan_price is not None:
            return plan_price.rates(source="plan")
    price = price_in_effect(model=model, upstream_model=upstream_model, at=at)
    if price is None:
        return None
    return price.rates(multiplier=plan.multiplier if plan is not None else Decimal(1), source="catalog")


def rates_for_models(*, account: Account | None, models: Sequence[tuple[str, str | None]], at: datetime) -> dict[str, Rates | None]:
    """`rates_for` of each `(model, upstream_model)` in `models`, by model, in three queries
    whatever their number (a page listing the catalog). `account` None: the catalog price, as a
    user's first call, which creates their account without a plan, would pay it."""
    wanted = {name for model, upstream in models for name in _price_names(model, upstream)}
    overrides: list[AccountPrice] = []
    plan_prices: list[PlanPrice] = []
    plan = account.plan if account is not None else None
    if account is not None:
        overrides = list(AccountPrice.objects.filter(account=account, model__in=wanted))
    if plan is not None:
        plan_prices = list(PlanPrice.objects.filter(plan=plan, model__in=wanted))
    latest: dict[str, Price] = {}
    for row in Price.objects.filter(model__in=wanted, effective_from__lte=at).order_by("model", "-effective_from"):
        latest.setdefault(row.model, row)  # the first of each model is the one in effect at `at`
    rates: dict[str, Rates | None] = {}
    for model, upstream in models:
        names = _price_names(model, upstream)
        override = _first_by_name(overrides, names)
        plan_price = _first_by_name(plan_prices, names)
        price = _first_by_name([latest[name] for name in names if name in latest], names)
        if override is not None:
            rates[model] = override.rates(source="account")
        elif plan_price is not None:
            rates[model] = plan_price.rates(source="plan")
        elif price is not None:
            rates[model] = price.rates(multiplier=plan.multiplier if plan is not None else Decimal(1), source="catalog")
        else:
            rates[model] = None
    return rates


@dataclass(frozen=True, slots=True)
class PeriodUsage:
    """What counts against an account's budgets at one instant: settled usage plus live holds."""

    day_cost_usd: Decimal
    month_cost_usd: Decimal
    day_tokens: int
    month_tokens: int
    reserved_usd: Decimal
    reserved_tokens: int


_PERIOD_USAGE: dict[str, str] = {}


def _period_usage_parts(connection: BaseDatabaseWrapper, asked: dict[str, str]) -> tuple[str, str, str]:
    """The select list and the two aggregates (`settled`, `held`) `period_usage` reads, for the
    SQL expressions `asked` gives for its inputs (day, month_first, month_end, user, account, at).
    Built as text once per kind of database: the ORM compiled its six correlated subqueries anew
    for every admission, at a cost of milliseconds of CPU each."""
    quote = connection.ops.quote_name

    def column(model: type[Model], name: str) -> str:
        return quote(_column(_field(model, name)))

    day, cost = column(DailyUsage, "day"), column(DailyUsage, "cost_usd")
    tokens = f"{column(DailyUsage, 'prompt_tokens')} + {column(DailyUsage, 'completion_tokens')}"
    select = "settled.day_cost, settled.month_cost, settled.day_tokens, settled.month_tokens, held.cost, held.tokens"
    settled = (
        f"SELECT COALESCE(SUM(CASE WHEN {day} = {asked['day']} THEN {cost} END), 0) AS day_cost,"
        f" COALESCE(SUM({cost}), 0) AS month_cost,"
        f" COALESCE(SUM(CASE WHEN {day} = {asked['day']} THEN {tokens} END), 0) AS day_tokens,"
        f" COALESCE(SUM({tokens}), 0) AS month_tokens"
        f" FROM {quote(DailyUsage._meta.db_table)}"
        f" WHERE {column(DailyUsage, 'user')} = {asked['user']} AND {day} >= {asked['month_first']} AND {day} < {asked['month_end']}"
    )
    held = (
        f"SELECT COALESCE(SUM({column(Reservation, 'cost_usd')}), 0) AS cost,"
        f" COALESCE(SUM({column(Reservation, 'tokens')}), 0) AS tokens"
        f" FROM {quote(Reservation._meta.db_table)}"
        f" WHERE {column(Reservation, 'account')} = {asked['account']} AND {column(Reservation, 'expires_at')} > {asked['at']}"
    )
    return select, settled, held


def _period_usage_statement(connection: BaseDatabaseWrapper) -> str:
    """`period_usage`'s statement for one account, its inputs as placeholders in the order
    `_period_usage_params` gives them."""
    if connection.vendor not in _PERIOD_USAGE:
        placeholders = dict.fromkeys(("day", "month_first", "month_end", "user", "account", "at"), "%s")
        select, settled, held = _period_usage_parts(connection, placeholders)
        _PERIOD_USAGE[connection.vendor] = f"SELECT {select} FROM ({settled}) AS settled, ({held}) AS held"
    return _PERIOD_USAGE[connection.vendor]


def _period_usage_params(connection: BaseDatabaseWrapper, account: Account, at: datetime) -> list[Any]:
    day = period_containing("day", at)
    month = period_containing("month", at)
    ops = connection.ops
    return [
        ops.adapt_datefield_value(day.first_day),
        ops.adapt_datefield_value(day.first_day),
        account.user_id,
        ops.adapt_datefield_value(month.first_day),
        ops.adapt_datefield_value(month.end_day),
        account.pk,
        ops.adapt_datetimefield_value(at),
    ]


_PERIOD_USAGES: dict[str, str] = {}


def _period_usages_statement(connection: BaseDatabaseWrapper) -> str:
    """`period_usages`' one PostgreSQL statement: `period_usage`'s reads for each row of arrays
    of inputs (`unnest`), in the arrays' order."""
    if connection.vendor not in _PERIOD_USAGES:

        def array_of(model: type[Model], name: str) -> str:
            return array_parameter(_field(model, name), connection)

        inputs = ("day", "month_first", "month_end", "user", "account", "at")
        quote = connection.ops.quote_name  # "user" is a reserved word
        select, settled, held = _period_usage_parts(connection, {name: f"asked.{quote(name)}" for name in inputs})
        arrays = ", ".join(
            [
                *(array_of(DailyUsage, "day") for _ in range(3)),
                array_of(DailyUsage, "user"),
                array_of(Reservation, "account"),
                array_of(Reservation, "expires_at"),
            ]
        )
        _PERIOD_USAGES[connection.vendor] = (
            f"SELECT {select} FROM unnest({arrays}) WITH ORDINALITY AS asked({', '.join(map(quote, inputs))}, position)"
            f" CROSS JOIN LATERAL ({settled}) AS settled CROSS JOIN LATERAL ({held}) AS held ORDER BY asked.position"
        )
    return _PERIOD_USAGES[connection.vendor]


def _period_usage_row(connection: BaseDatabaseWrapper, row: Sequence[object]) -> PeriodUsage:
    day_cost, month_cost, day_tokens, month_tokens, held_cost, held_tokens = row

    def money(value: object) -> Decimal:
        return cast(Decimal, _MONEY.from_db_value(value, None, connection))

    return PeriodUsage(
        day_cost_usd=money(day_cost),
        month_cost_usd=money(month_cost),
        day_tokens=int(cast(int, day_tokens)),
        month_tokens=int(cast(int, month_tokens)),
        reserved_usd=money(held_cost),
        reserved_tokens=int(cast(int, held_tokens)),
    )


def period_usage(*, account: Account, at: datetime, using: str = DEFAULT_DB_ALIAS) -> PeriodUsage:
    """Settled usage in the day and month containing `at`, and the holds still live at `at`.

    One SQL statement, so it reads one snapshot: a ledger write (rollup up, reservation gone)
    commits atomically and is seen either wholly or not at all, never counted twice or missed.
    """
    connection = connections[using]
    with hot_cursor(connection) as cursor:
        cursor.execute(_period_usage_statement(connection), _period_usage_params(connection, account, at))
        return _period_usage_row(connection, cursor.fetchone())


def period_usages(*, asked: Sequence[tuple[Account, datetime]], using: str = DEFAULT_DB_ALIAS) -> list[PeriodUsage]:
    """`period_usage` of each (account, instant) of `asked`, in order.

    PostgreSQL reads them all in one statement (one snapshot, one round trip, however many
    accounts a batch of admissions holds for); SQLite, in process, one after another.
    """
    connection = connections[using]
    if connection.vendor != "postgresql" or len(asked) == 1:
        return [period_usage(account=account, at=at, using=using) for account, at in asked]
    with hot_cursor(connection) as cursor:
        cursor.execute(_period_usages_statement(connection), _period_usages_params(connection, asked))
        return [_period_usage_row(connection, row) for row in cursor.fetchall()]


async def aperiod_usages(
    *, asked: Sequence[tuple[Account, datetime]], connection: psycopg.AsyncConnection[Any], using: str = DEFAULT_DB_ALIAS
) -> list[PeriodUsage]:
    """`period_usages` on a PostgreSQL connection of the event loop (`infra.async_postgres`)."""
    if not asked:
        return []
    wrapper = connections[using]
    cursor = await connection.execute(_period_usages_statement(wrapper), _period_usages_params(wrapper, asked))
    return [_period_usage_row(wrapper, row) for row in await cursor.fetchall()]


def _period_usages_params(connection: BaseDatabaseWrapper, asked: Sequence[tuple[Account, datetime]]) -> list[list[object]]:
    columns: list[list[object]] = [[] for _ in range(6)]
    for account, at in asked:
        day, _, user_id, month_first, month_end, account_id, instant = _period_usage_params(connection, account, at)
        for column, value in zip(columns, (day, month_first, month_end, user_id, account_id, instant), strict=True):
            column.append(value)
    return columns


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: Decimal


def ledger_totals(*, user_id: int | None = None) -> UsageTotals:
    """A fresh `SUM()` over the ledger."""
    rows = UsageRecord.objects.all() if user_id is None else UsageRecord.objects.filter(user_id=user_id)
    totals = rows.aggregate(
        requests=Count("id"),
        prompt_tokens=Coalesce(Sum("prompt_tokens"), 0),
        completion_tokens=Coalesce(Sum("completion_tokens"), 0),
        cached_tokens=Coalesce(Sum("cached_tokens"), 0),
        cost_usd=Coalesce(Sum("cost_usd"), Value(0), output_field=_MONEY),
    )
    return UsageTotals(**{**totals, "cost_usd": Decimal(totals["cost_usd"])})


def rollup_totals(*, user_id: int | None = None) -> UsageTotals:
    rows = DailyUsage.objects.all() if user_id is None else DailyUsage.objects.filter(user_id=user_id)
    totals = rows.aggregate(
        requests=Coalesce(Sum("requests"), 0),
        prompt_tokens=Coalesce(Sum("prompt_tokens"), 0),
        completion_tokens=Coalesce(Sum("completion_tokens"), 0),
        cached_tokens=Coalesce(Sum("cached_tokens"), 0),
        cost_usd=Coalesce(Sum("cost_usd"), Value(0), output_field=_MONEY),
    )
    return UsageTotals(**{**totals, "cost_usd": Decimal(totals["cost_usd"])})
