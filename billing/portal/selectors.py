"""Reads for one user's own page: spend per day and per model over a range of days, spend per API
key, and their budgets with what is used and held.

Like the cost console (`billing.console.selectors`) every figure comes from the daily rollups
(`DailyUsage`, `DailyKeyUsage`, kept in each ledger row's transaction, so equal to the ledger's
`SUM()` and to `export_costs`) and the small tables (account, reservations), never from the
ledger: a page view costs the same whatever the user's history. Every read is filtered by the
user first, through the rollups' `(user, model, day)` unique index.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.db.models import Sum

from billing.console.selectors import (
    AccountBudgets,
    Budget,
    BudgetKind,
    BudgetPeriod,
    DaySpend,
    UsageSums,
)
from billing.models import Account, DailyKeyUsage, DailyUsage
from billing.money import money_sum
from billing.periods import Period
from billing.selectors import period_usage


@dataclass(frozen=True, slots=True)
class ModelUsage:
    model: str
    sums: UsageSums


@dataclass(frozen=True, slots=True)
class UserUsage:
    """One user's usage over `days`: per day (every day, zero where nothing was spent), per model
    (largest spend first) and in total."""

    days: Period
    by_day: list[DaySpend]
    by_model: list[ModelUsage]
    totals: UsageSums


def _add(rows: list[UsageSums]) -> UsageSums:
    return UsageSums(
        requests=sum(row.requests for row in rows),
        prompt_tokens=sum(row.prompt_tokens for row in rows),
        completion_tokens=sum(row.completion_tokens for row in rows),
        cached_tokens=sum(row.cached_tokens for row in rows),
        cost_usd=money_sum([row.cost_usd for row in rows]),
        cancelled_requests=sum(row.cancelled_requests or 0 for row in rows),
        failed_requests=sum(row.failed_requests or 0 for row in rows),
    )


def user_usage(*, user_id: int, days: Period) -> UserUsage:
    """Spend per day and per model of one user over `days`, and the total. One query.

    The rollup rows of the range (at most days x models) are read once and added up here, in
    `Decimal`, by day and by model.
    """
    rows = (
        DailyUsage.objects.filter(user_id=user_id, day__gte=days.first_day, day__lt=days.end_day)
        .order_by()
        .values_list(
            "day", "model", "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd",
            "cancelled_requests", "failed_requests",
        )
    )
    per_day: dict[date, list[UsageSums]] = defaultdict(list)
    per_model: dict[str, list[UsageSums]] = defaultdict(list)
    everything = []
    for day, model, requests, prompt, completion, cached, cost, cancelled, failed in rows:
        sums = UsageSums(
            requests=requests, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
            cost_usd=cost, cancelled_requests=cancelled, failed_requests=failed,
        )
        per_day[day].append(sums)
        per_model[model].append(sums)
        everything.append(sums)
    by_day = []
    for offset in range(days.days):
        day = days.first_day + timedelta(days=offset)
        day_sums = _add(per_day.get(day, []))
        by_day.append(DaySpend(day=day, cost_usd=day_sums.cost_usd, requests=day_sums.requests))
    by_model = sorted(
        (ModelUsage(model=model, sums=_add(sums)) for model, sums in per_model.items()),
        key=lambda usage: (-usage.sums.cost_usd, usage.model),
    )
    return UserUsage(days=days, by_day=by_day, by_model=by_model, totals=_add(everything))


def user_key_spend(*, user_id: int, days: Period) -> dict[int, UsageSums]:
    """Requests, tokens and spend of each of the user's API keys over `days`, by key id. One query."""
    rows = (
        DailyKeyUsage.objects.filter(api_key__user_id=user_id, day__gte=days.first_day, day__lt=days.end_day)
        .order_by()
        .values("api_key_id")
        .annotate(
            requests=Sum("requests"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            cached_tokens=Sum("cached_tokens"),
            cost_usd=Sum("cost_usd"),
        )
    )
    return {
        row["api_key_id"]: UsageSums(
            requests=row["requests"] or 0,
            prompt_tokens=row["prompt_tokens"] or 0,
            completion_tokens=row["completion_tokens"] or 0,
            cached_tokens=row["cached_tokens"] or 0,
            cost_usd=row["cost_usd"] or Decimal(0),
        )
        for row in rows
    }


def user_budgets(*, user_id: int, at: datetime, account: Account | None = None) -> AccountBudgets | None:
    """The user's budgets at `at`, as an admission counts them (settled + held); None when the
    user has no account or no limit. Two queries (one when there is no account); one fewer when
    the caller has read the user's `account` (with its plan) already.
    """
    if account is None:
        account = Account.objects.select_related("plan").filter(user_id=user_id).first()
    if account is None or not account.has_limits:
        return None
    usage = period_usage(account=account, at=at)
    candidates: list[tuple[BudgetKind, BudgetPeriod, Decimal | int | None, Decimal, Decimal]] = [
        ("spend", "day", account.daily_spend_limit_usd, usage.day_cost_usd, usage.reserved_usd),
        ("spend", "month", account.monthly_spend_limit_usd, usage.month_cost_usd, usage.reserved_usd),
        ("tokens", "day", account.daily_token_limit, Decimal(usage.day_tokens), Decimal(usage.reserved_tokens)),
        ("tokens", "month", account.monthly_token_limit, Decimal(usage.month_tokens), Decimal(usage.reserved_tokens)),
    ]
    budgets = tuple(
        Budget(kind=kind, period=period, limit=Decimal(limit), spent=spent, held=held)
        for kind, period, limit, spent, held in candidates
        if limit is not None
    )
    return AccountBudgets(
        account_id=account.pk,
        user_id=user_id,
        username="",
        plan=account.plan.name if account.plan is not None else "",
        soft_threshold=account.soft_threshold,
        budgets=budgets,
    )
