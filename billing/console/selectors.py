"""Reads for the cost console: spend per period, per day, per user, key, model and endpoint, latency, budgets.

Every figure about money, tokens and how calls ended comes from the daily rollups (`DailyUsage`,
`DailyKeyUsage`) and the small tables (accounts, reservations), read over a range of days through
their `day` index: a page costs the same whatever the size of the ledger. The rollups are kept in
the ledger row's own transaction, so they equal the ledger's `SUM()` (and `export_costs`).

A page's range of days is read in two passes over `DailyUsage` (a row per user, model, endpoint
and day): `range_totals`, grouped by day, model and endpoint, gives the chart, the totals, the
models and the endpoints, added up here; `top_spenders` groups by user. Those passes are most of
the console's time (on PostgreSQL, with the admin bench's 2,200 rollups a day, about 25 ms each
for 30 days, 30 to 50 ms for a year), so a figure that can be added up from a pass already read
gets no pass of its own.

One figure reads the ledger: time to first token. A percentile cannot be added up from daily
sums, so `ttft_by_model` reads the calls of a bounded window (the console asks for the last
24 hours) through the `created_at` index and ranks them in the database (nearest rank, see
there). Its cost grows with the calls in that window, not with the ledger: measured on PostgreSQL
with 85,000 calls in the last 24 hours of a 1,000,000-row ledger, about 40 ms.

Every read takes the instant or the days it is about (`at=`, `days=`): nothing here reads a clock.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from django.contrib.auth import get_user_model
from django.db import connections
from django.db.models import (
    Aggregate,
    BigIntegerField,
    Count,
    F,
    OuterRef,
    Q,
    Subquery,
    Sum,
    Window,
)
from django.db.models.functions import RowNumber

from billing.models import Account, DailyKeyUsage, DailyUsage, Reservation, UsageRecord
from billing.money import money_ratio, money_sum
from billing.periods import Period, PeriodKind, days_ending, period_containing

Dimension = Literal["user", "key", "model"]

SORT_KEYS: dict[str, str] = {
    "cost": "cost_usd",
    "requests": "requests",
    "input": "prompt_tokens",
    "output": "completion_tokens",
    "name": "label",
}
UNKNOWN_SORT = "Unknown sort {value!r}: expected one of {keys}, optionally with a leading '-'."
TTFT_PERCENTILES = (50, 95)
BudgetKind = Literal["spend", "tokens"]
BudgetPeriod = Literal["day", "month"]
BUDGET_SLOTS: tuple[tuple[BudgetKind, BudgetPeriod], ...] = (
    ("spend", "day"), ("spend", "month"), ("tokens", "day"), ("tokens", "month"),
)


# --- Spend per period ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeriodSpend:
    """Spend in a period so far, against the same days of the period before.

    `current` runs from the period's first day through the day of `at` (today, partial);
    `previous` is as many days from the start of the period before, so a month to the 15th is
    compared with the 1st to the 15th of last month (all of last month if it is shorter).
    """

    kind: PeriodKind
    current: Period
    previous: Period
    spent: Decimal
    previous_spent: Decimal

    @property
    def change(self) -> Decimal | None:
        """The change as a fraction of the previous spend; None when there was none before."""
        if self.previous_spent <= 0:
            return None
        return money_ratio(money_sum([self.spent, -self.previous_spent]), self.previous_spent)


def _days(period: Period) -> Q:
    return Q(day__gte=period.first_day, day__lt=period.end_day)


def _days_of_any(periods: Iterable[Period]) -> Q:
    """The days of any of `periods`: one range per run of overlapping or adjacent periods."""
    runs: list[tuple[date, date]] = []
    for period in sorted(periods, key=lambda period: period.first_day):
        if runs and period.first_day <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], period.end_day))
        else:
            runs.append((period.first_day, period.end_day))
    days = Q()
    for first_day, end_day in runs:
        days |= Q(day__gte=first_day, day__lt=end_day)
    return days


def spend_by_period(*, at: datetime, kinds: Sequence[PeriodKind] = ("day", "week", "month")) -> list[PeriodSpend]:
    """Today, this week and this month so far, each with the same days of the period before. One query.

    It reads the spend of each day those periods cover (not the days between them: on the 2nd of
    a month, the 1st and 2nd of the month before, not all of it) and adds each period's up here.
    Grouped by day, PostgreSQL sums one column per row; a `SUM() FILTER` per period took three
    times as long.
    """
    today = period_containing("day", at)
    pairs = []
    for kind in kinds:
        whole = period_containing(kind, at)
        current = whole.first((today.end_day - whole.first_day).days)
        pairs.append((kind, current, whole.previous().first(current.days)))
    if not pairs:
        return []
    spent_on: dict[date, Decimal] = dict(
        DailyUsage.objects.filter(_days_of_any(period for _, current, previous in pairs for period in (current, previous)))
        .order_by()
        .values_list("day")
        .annotate(cost_usd=Sum("cost_usd"))
    )

    def spent(period: Period) -> Decimal:
        return money_sum([cost for day, cost in spent_on.items() if period.first_day <= day < period.end_day])

    return [
        PeriodSpend(kind=kind, current=current, previous=previous, spent=spent(current), previous_spent=spent(previous))
        for kind, current, previous in pairs
    ]


# --- A range of days: in all, per day, per model and per endpoint ----------------------------


@dataclass(frozen=True, slots=True)
class DaySpend:
    day: date
    cost_usd: Decimal
    requests: int


def console_days(*, at: datetime, days: int) -> Period:
    """The `days` calendar days the console shows, ending today (the day of `at`)."""
    return days_ending(at, days=days)


@dataclass(frozen=True, slots=True)
class UsageSums:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: Decimal
    cancelled_requests: int | None = None  # None: not counted for this dimension (API keys)
    failed_requests: int | None = None


_SUMS: dict[str, Any] = {
    "requests": Sum("requests"),
    "prompt_tokens": Sum("prompt_tokens"),
    "completion_tokens": Sum("completion_tokens"),
    "cached_tokens": Sum("cached_tokens"),
    "cost_usd": Sum("cost_usd"),
}
_ENDED: dict[str, Any] = {"cancelled_requests": Sum("cancelled_requests"), "failed_requests": Sum("failed_requests")}


def _sums(row: Mapping[str, Any], *, ended: bool) -> UsageSums:
    return UsageSums(
        requests=row["requests"] or 0,
        prompt_tokens=row["prompt_tokens"] or 0,
        completion_tokens=row["completion_tokens"] or 0,
        cached_tokens=row["cached_tokens"] or 0,
        cost_usd=row["cost_usd"] or Decimal(0),
        cancelled_requests=(row["cancelled_requests"] or 0) if ended else None,
        failed_requests=(row["failed_requests"] or 0) if ended else None,
    )


# The sums of a range's rollups of one day, model and endpoint, in `UsageSums`' order.
_Sums = tuple[int, int, int, int, Decimal, int, int]


def _added(groups: Sequence[_Sums]) -> UsageSums:
    """The sums of some groups of a range, added up exactly."""
    if not groups:
        return UsageSums(0, 0, 0, 0, Decimal(0), 0, 0)
    requests, prompt, completion, cached, cost, cancelled, failed = zip(*groups, strict=True)
    return UsageSums(
        requests=sum(requests),
        prompt_tokens=sum(prompt),
        completion_tokens=sum(completion),
        cached_tokens=sum(cached),
        cost_usd=money_sum(cost),
        cancelled_requests=sum(cancelled),
        failed_requests=sum(failed),
    )


@dataclass(frozen=True, slots=True)
class EndpointSpend:
    """One API (`UsageRecord.Endpoint`) over a range of days, and its share of the range's spend."""

    endpoint: str
    path: str  # /v1/chat/completions
    sums: UsageSums
    share: Decimal  # of the range's spend, 0 to 1; 0 when nothing was spent


@dataclass(frozen=True, slots=True)
class RangeTotals:
    all_calls: UsageSums
    with_a_key_usd: Decimal  # spent by calls made with an API key that still exists
    by_day: list[DaySpend]  # spend per calendar day of the range, one entry per day (zero where none)
    by_model: dict[str, UsageSums]  # the models called in the range
    by_endpoint: list[EndpointSpend]  # the endpoints called in the range, the costliest first (ties by name)

    @property
    def without_a_key_usd(self) -> Decimal:
        """Spend by calls made without a key (the chat page) or with a key since deleted."""
        return money_sum([self.all_calls.cost_usd, -self.with_a_key_usd])


def range_totals(*, days: Period) -> RangeTotals:
    """Requests, tokens, spend and how calls ended over `days`, in all, per day, per model and per
    endpoint; and how much of the spend had a key. Two queries.

    The range's rollups are read in one pass, grouped by day, model and endpoint (at most days x
    models x endpoints groups: 728 for the admin bench's 91 days of 8 models), and those groups are
    added up here, exactly, per day, model and endpoint and in all. On PostgreSQL, over the bench's
    200,000 rollups, that pass takes about 1.5 times a pass grouped by one of them: the three
    groupings read apart took three passes.
    """
    per_day: dict[date, list[_Sums]] = defaultdict(list)
    per_model: dict[str, list[_Sums]] = defaultdict(list)
    per_endpoint: dict[str, list[_Sums]] = defaultdict(list)
    every: list[_Sums] = []
    rows = (
        DailyUsage.objects.filter(_days(days))
        .order_by()
        .values("day", "model", "endpoint")
        .annotate(**_SUMS, **_ENDED)
        .values_list("day", "model", "endpoint", *_SUMS, *_ENDED)
    )
    for day, model, endpoint, requests, prompt, completion, cached, cost, cancelled, failed in rows:
        group = (requests, prompt, completion, cached, cost, cancelled, failed)
        per_day[day].append(group)
        per_model[model].append(group)
        per_endpoint[endpoint].append(group)
        every.append(group)
    all_calls = _added(every)
    with_a_key = DailyKeyUsage.objects.filter(_days(days)).aggregate(cost_usd=Sum("cost_usd"))["cost_usd"]
    by_day = []
    for offset in range(days.days):
        day = days.first_day + timedelta(days=offset)
        sums = _added(per_day.get(day, []))
        by_day.append(DaySpend(day=day, cost_usd=sums.cost_usd, requests=sums.requests))
    paths = dict(UsageRecord.Endpoint.choices)
    spent = all_calls.cost_usd
    endpoints = [(endpoint, _added(found)) for endpoint, found in per_endpoint.items()]
    return RangeTotals(
        all_calls=all_calls,
        with_a_key_usd=with_a_key or Decimal(0),
        by_day=by_day,
        by_model={model: _added(found) for model, found in per_model.items()},
        by_endpoint=[
            EndpointSpend(
                endpoint=endpoint,
                path=str(paths.get(endpoint, endpoint)),
                sums=sums,
                share=money_ratio(sums.cost_usd, spent) if spent > 0 else Decimal(0),
            )
            for endpoint, sums in sorted(endpoints, key=lambda item: (-item[1].cost_usd, item[0]))
        ],
    )


# --- Top spenders ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpendRow:
    """One user, key or model over a range of days: `id` is what the ledger is filtered by."""

    id: int | str
    label: str
    detail: str
    sums: UsageSums


def sort_order(value: str) -> str:
    """The ORM ordering for a console sort parameter (`cost`, `-cost`, `name`, ...)."""
    key = value.removeprefix("-")
    if key not in SORT_KEYS:
        raise ValueError(UNKNOWN_SORT.format(value=value, keys=", ".join(SORT_KEYS)))
    return ("-" if value.startswith("-") else "") + SORT_KEYS[key]


class _GroupName(Subquery):
    """A name for each group of an aggregate, read after grouping, from the group's key alone.

    Django groups a `values()` query by every annotation that is no aggregate; this one depends
    only on the group's key, already grouped, so it is left out of the GROUP BY (as the
    documented `get_group_by_cols()` of an aggregate is). Grouping by the key alone is what keeps
    a year of rollups fast: grouped by the joined names too, PostgreSQL sorted every rollup row by
    them (0.1 s for a year of 300 users or 1,000 keys, a third of that grouped by the key).
    """

    def get_group_by_cols(self) -> list[Any]:
        return []


def _named(model: Any, field: str, *, key: str) -> _GroupName:
    """`field` of the `model` row the group's `key` column points at."""
    return _GroupName(model.objects.filter(pk=OuterRef(key)).order_by().values(field)[:1])


def top_spenders(*, by: Literal["user", "key"], days: Period, sort: str = "-cost", limit: int = 10) -> list[SpendRow]:
    """The first `limit` users or keys over `days` in `sort` order. One query.

    Ties are broken by the row's id, so a page reads the same twice. (Models: `top_models`.)
    """
    order = sort_order(sort)
    rows: Any  # values() of one of two shapes
    if by == "user":
        user_model = get_user_model()
        rows = (
            DailyUsage.objects.filter(_days(days))
            .order_by()
            .values(group_key=F("user_id"))
            .annotate(label=_named(user_model, user_model.USERNAME_FIELD, key="user_id"), **_SUMS, **_ENDED)
        )
    elif by == "key":
        api_key_model = DailyKeyUsage._meta.get_field("api_key").related_model  # the edge's model
        rows = (
            DailyKeyUsage.objects.filter(_days(days))
            .order_by()
            .values(group_key=F("api_key_id"))
            .annotate(
                label=_named(api_key_model, "prefix", key="api_key_id"),
                detail=_named(api_key_model, "name", key="api_key_id"),
                owner=_named(api_key_model, f"user__{get_user_model().USERNAME_FIELD}", key="api_key_id"),
                **_SUMS,
            )
        )
    else:
        raise ValueError(f"Unknown dimension {by!r}.")
    result = []
    for row in rows.order_by(order, "group_key")[:limit]:
        detail = ""
        if by == "key":  # the key's name, and whose it is
            detail = " · ".join(part for part in (row["detail"], row["owner"]) if part)
        result.append(SpendRow(id=row["group_key"], label=row["label"], detail=detail, sums=_sums(row, ended=by != "key")))
    return result


def top_models(totals: RangeTotals, *, sort: str = "-cost", limit: int = 10) -> list[SpendRow]:
    """The first `limit` models of a range in `sort` order, from its totals: no query.

    Ties are broken by the model's name, in code point order (as PostgreSQL's C collation and
    SQLite order them).
    """
    order = sort_order(sort)
    descending = order.startswith("-")
    field = order.removeprefix("-")
    by_name = sorted(totals.by_model.items())
    if field == "label":
        ranked = by_name[::-1] if descending else by_name
    else:  # a stable sort, reversed or not: ties stay in name order
        ranked = sorted(by_name, key=lambda item: getattr(item[1], field), reverse=descending)
    return [SpendRow(id=model, label=model, detail="", sums=sums) for model, sums in ranked[:limit]]


# --- Time to first token ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Latency:
    """Time to first token of one model's calls in a window, in microseconds (nearest rank)."""

    model: str
    calls: int  # calls that produced a first token
    p50_us: int
    p95_us: int


class _PercentileDisc(Aggregate):
    """PostgreSQL's `percentile_disc(p) WITHIN GROUP (ORDER BY x)`: the nearest-rank percentile."""

    function = "PERCENTILE_DISC"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = BigIntegerField()

    def __init__(self, expression: str, *, percentile: int) -> None:
        # A constant of this module, written into the SQL as a decimal literal (0.50, 0.95).
        super().__init__(expression, fraction=format(Decimal(percentile).scaleb(-2), "f"))


def _rank(percentile: int) -> Any:
    # Nearest rank: the ceil(p x n / 100)-th smallest value, in integer arithmetic.
    return (F("n") * percentile + 99) / 100


def ttft_by_model(*, since: datetime, until: datetime) -> dict[str, Latency]:
    """p50 and p95 time to first token per model of the calls made in `[since, until)`. One query.

    Reads the ledger, bounded by the `created_at` index to the window (see the module docstring).
    Both percentiles are nearest rank (the ceil(p x n)-th smallest value). PostgreSQL computes
    them as ordered-set aggregates, one sort per model shared by both (40 ms for 85,000 calls);
    elsewhere (SQLite) each model's calls are numbered by `ROW_NUMBER()` and the two ranks kept,
    the same values, which on PostgreSQL took three times as long.
    """
    calls = UsageRecord.objects.filter(created_at__gte=since, created_at__lt=until, ttft_us__isnull=False).order_by()
    p50, p95 = TTFT_PERCENTILES
    if connections[calls.db].vendor == "postgresql":
        rows = calls.values("model").annotate(
            n=Count("id"), p50=_PercentileDisc("ttft_us", percentile=p50), p95=_PercentileDisc("ttft_us", percentile=p95)
        )
        return {
            row["model"]: Latency(model=row["model"], calls=row["n"], p50_us=row["p50"], p95_us=row["p95"])
            for row in sorted(rows, key=lambda row: row["model"])
        }
    ranked = (
        calls.annotate(
            rank=Window(RowNumber(), partition_by=[F("model")], order_by=[F("ttft_us").asc(), F("id").asc()]),
            n=Window(Count("id"), partition_by=[F("model")]),
        )
        .filter(Q(rank=_rank(p50)) | Q(rank=_rank(p95)))
        .values_list("model", "n", "rank", "ttft_us")
    )
    found: dict[str, dict[str, int]] = {}
    for model, n, rank, ttft_us in ranked:
        if ttft_us is None:  # excluded by the filter; for the type checker
            continue
        entry = found.setdefault(model, {"n": n})
        for percentile in TTFT_PERCENTILES:
            if rank == (n * percentile + 99) // 100:
                entry[f"p{percentile}"] = ttft_us
    return {
        model: Latency(model=model, calls=entry["n"], p50_us=entry["p50"], p95_us=entry["p95"])
        for model, entry in sorted(found.items())
    }


# --- Budgets ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Budget:
    """One limit of an account at an instant: settled use, live holds, and what is left.

    Used and left count holds, as an admission does (`billing.services`): a budget is used by
    what was spent plus what calls in flight may still spend.
    """

    kind: BudgetKind
    period: BudgetPeriod
    limit: Decimal  # USD, or tokens
    spent: Decimal
    held: Decimal
    # Derived once (a page draws each several times).
    used: Decimal = field(init=False)
    left: Decimal = field(init=False)
    over: Decimal = field(init=False)
    fraction: Decimal = field(init=False)  # used / limit; a limit of zero admits nothing: 1

    def __post_init__(self) -> None:
        used = money_sum([self.spent, self.held])
        object.__setattr__(self, "used", used)
        object.__setattr__(self, "left", max(money_sum([self.limit, -used]), Decimal(0)))
        object.__setattr__(self, "over", max(money_sum([used, -self.limit]), Decimal(0)))
        object.__setattr__(self, "fraction", Decimal(1) if self.limit <= 0 else money_ratio(used, self.limit))

    def share(self, amount: Decimal) -> Decimal:
        """`amount` as a fraction of the limit, at most 1 (for drawing)."""
        if self.limit <= 0:
            return Decimal(1) if amount > 0 else Decimal(0)
        return min(money_ratio(amount, self.limit), Decimal(1))


@dataclass(frozen=True, slots=True)
class AccountBudgets:
    account_id: int
    user_id: int
    username: str
    plan: str
    soft_threshold: Decimal
    budgets: tuple[Budget, ...]  # the limits set (at least one)
    fullest: Decimal = field(init=False)  # the largest used fraction of its budgets
    past_threshold: bool = field(init=False)

    def __post_init__(self) -> None:
        fullest = max(budget.fraction for budget in self.budgets)
        object.__setattr__(self, "fullest", fullest)
        object.__setattr__(self, "past_threshold", fullest >= self.soft_threshold)

    @property
    def slots(self) -> tuple[Budget | None, ...]:
        """Daily spend, monthly spend, daily tokens, monthly tokens: each budget, or None if unset."""
        found = {(budget.kind, budget.period): budget for budget in self.budgets}
        return tuple(found.get(slot) for slot in BUDGET_SLOTS)


_HAS_LIMITS = (
    Q(daily_spend_limit_usd__isnull=False)
    | Q(monthly_spend_limit_usd__isnull=False)
    | Q(daily_token_limit__isnull=False)
    | Q(monthly_token_limit__isnull=False)
)


def account_budgets(*, at: datetime) -> list[AccountBudgets]:
    """Every account with a limit, those past their soft threshold first, then the fullest first. Three queries.

    The same figures an admission checks (`billing.selectors.period_usage`): spend and tokens
    settled in the day and month containing `at`, plus the holds live at `at`.
    """
    day = period_containing("day", at)
    month = period_containing("month", at)
    accounts = list(
        Account.objects.filter(_HAS_LIMITS)
        .order_by()
        .values_list(
            "pk", "user_id", f"user__{get_user_model().USERNAME_FIELD}", "plan__name",
            "soft_threshold", "daily_spend_limit_usd", "monthly_spend_limit_usd", "daily_token_limit", "monthly_token_limit",
        )
    )
    limited = Account.objects.filter(_HAS_LIMITS)
    tokens = F("prompt_tokens") + F("completion_tokens")
    today = Q(day=day.first_day)
    settled = {
        row["user_id"]: row
        for row in DailyUsage.objects.filter(_days(month), user_id__in=limited.values("user_id"))
        .order_by()
        .values("user_id")
        .annotate(
            day_cost=Sum("cost_usd", filter=today),
            month_cost=Sum("cost_usd"),
            day_tokens=Sum(tokens, filter=today),
            month_tokens=Sum(tokens),
        )
    }
    held = {
        row["account_id"]: row
        for row in Reservation.objects.filter(expires_at__gt=at, account__in=limited)
        .order_by()
        .values("account_id")
        .annotate(cost=Sum("cost_usd"), tokens=Sum("tokens"))
    }
    boards = []
    for pk, user_id, username, plan, threshold, day_usd, month_usd, day_tokens, month_tokens in accounts:
        use: Mapping[str, Any] = settled.get(user_id, {})
        hold: Mapping[str, Any] = held.get(pk, {})
        held_usd = hold.get("cost") or Decimal(0)
        held_tokens = Decimal(hold.get("tokens") or 0)
        candidates: list[tuple[BudgetKind, BudgetPeriod, Decimal | int | None, Decimal, Decimal]] = [
            ("spend", "day", day_usd, use.get("day_cost") or Decimal(0), held_usd),
            ("spend", "month", month_usd, use.get("month_cost") or Decimal(0), held_usd),
            ("tokens", "day", day_tokens, Decimal(use.get("day_tokens") or 0), held_tokens),
            ("tokens", "month", month_tokens, Decimal(use.get("month_tokens") or 0), held_tokens),
        ]
        budgets = tuple(
            Budget(kind=kind, period=period, limit=Decimal(limit), spent=spent, held=on_hold)
            for kind, period, limit, spent, on_hold in candidates
            if limit is not None
        )
        boards.append(
            AccountBudgets(
                account_id=pk, user_id=user_id, username=username, plan=plan or "",
                soft_threshold=threshold, budgets=budgets,
            )
        )
    boards.sort(key=lambda board: (not board.past_threshold, -board.fullest, board.username))
    return boards


def latency_window(*, at: datetime, hours: int = 24) -> tuple[datetime, datetime]:
    """The window `ttft_by_model` reads for the console: the `hours` before `at`."""
    return at - timedelta(hours=hours), at
