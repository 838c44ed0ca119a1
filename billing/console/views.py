"""The cost console page (`/admin/console/`): where staff who may read costs land in the admin.

Wired by the project's admin site (`llmgateway.admin_site.GatewayAdminSite.get_urls`) through
`admin_site.admin_view`, so only active staff reach it (others are sent to the admin login); it
then requires the view permission on usage records, as the ledger and the cost export do (403).

Query parameters (all optional; a bad one gives the page with its default and a 400):
`days` (1-366, default 30) for the chart and the tables, `top` (10, 25, 50 or 100 rows) and the
sort of each table, `o_user`, `o_key`, `o_model` (`cost`, `requests`, `input`, `output`, `name`,
with `-` for descending).

What it reads is in `billing.console.selectors`: rollups and small tables, whatever the size of
the ledger, except time to first token over the last 24 hours. Its clock is `now` below, which
tests replace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.contrib.admin import AdminSite
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, QueryDict
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from billing.console import selectors
from billing.console.chart import spend_chart_svg
from billing.console.selectors import SORT_KEYS, Dimension, EndpointSpend, Latency, SpendRow
from billing.models import UsageRecord
from billing.periods import Period, billing_zone

now = timezone.now  # the console's clock

DEFAULT_DAYS = 30
MAX_DAYS = 366
DAY_CHOICES = (7, 30, 90, 365)
TOP_CHOICES = (10, 25, 50, 100)
DEFAULT_SORT = "-cost"
BUDGET_ROWS = 100  # accounts shown; the rest are one click away in the account list
LATENCY_HOURS = 24
# The page (`admin/console.html`) with billing's sections added below it (spend per endpoint).
CONSOLE_TEMPLATE = "admin/billing/console.html"

_SORTS = [(key, key) for key in SORT_KEYS] + [(f"-{key}", f"-{key}") for key in SORT_KEYS]
_LEDGER_FILTER: dict[Dimension, str] = {"user": "user__id__exact", "key": "api_key__id__exact", "model": "model__exact"}
_TITLES: dict[Dimension, str] = {"user": "Users", "key": "API keys", "model": "Models"}
_COLUMNS = (("name", ""), ("cost", "Spend"), ("requests", "Calls"), ("input", "Tokens in"), ("output", "Tokens out"))


class ConsoleQuery(forms.Form):
    days = forms.IntegerField(min_value=1, max_value=MAX_DAYS, required=False)
    top = forms.TypedChoiceField(choices=[(n, n) for n in TOP_CHOICES], coerce=int, required=False, empty_value=None)
    o_user = forms.ChoiceField(choices=_SORTS, required=False)
    o_key = forms.ChoiceField(choices=_SORTS, required=False)
    o_model = forms.ChoiceField(choices=_SORTS, required=False)

    def setting(self, name: str, default: Any) -> Any:
        """The parameter's value, or `default` when it is absent or bad."""
        value = getattr(self, "cleaned_data", {}).get(name)
        return default if value in (None, "") else value


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    title: str
    url: str
    direction: str  # "", "ascending" or "descending": how the table is sorted by this column


@dataclass(frozen=True, slots=True)
class Row:
    spend: SpendRow
    ledger_url: str
    latency: Latency | None = None


@dataclass(frozen=True, slots=True)
class EndpointRow:
    spend: EndpointSpend
    ledger_url: str


@dataclass(frozen=True, slots=True)
class Table:
    dimension: Dimension
    title: str
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)


def console_permitted(request: HttpRequest, admin_site: AdminSite) -> bool:
    """May this staff member read the console: the admin's view permission on usage records."""
    return admin_site.get_model_admin(UsageRecord).has_view_permission(request)


def ledger_url(*, period: Period, ledger: str = "", **filters: Any) -> str:
    """The ledger's admin list (at `ledger`, else reversed), filtered to `period`'s days and `filters`.

    The days are the list's own date filter (`since`, `until`: billing days, as the rollups the
    console reads), which the list answers from the rollups too; the chart links each of its
    days, so its page reverses the list's path once and passes it.
    """
    query = {**filters, "since": period.first_day.isoformat(), "until": period.end_day.isoformat()}
    return f"{ledger or reverse('admin:billing_usagerecord_changelist')}?{urlencode(query)}"


def _with(query: QueryDict, **changes: Any) -> str:
    updated = query.copy()
    for name, value in changes.items():
        updated[name] = str(value)
    return f"?{updated.urlencode()}"


def _columns(query: QueryDict, param: str, current: str) -> list[Column]:
    columns = []
    for key, title in _COLUMNS:
        if current.removeprefix("-") == key:
            direction = "descending" if current.startswith("-") else "ascending"
            toggled = key if current.startswith("-") else f"-{key}"
        else:
            direction = ""
            toggled = key if key == "name" else f"-{key}"  # numbers: largest first
        columns.append(Column(key=key, title=title or "Name", url=_with(query, **{param: toggled}), direction=direction))
    return columns


def _table(
    dimension: Dimension, spenders: list[SpendRow], *, query: QueryDict, sort: str, days: Period, latency: dict[str, Latency],
    ledger: str,
) -> Table:
    rows = [
        Row(
            spend=row,
            ledger_url=ledger_url(period=days, ledger=ledger, **{_LEDGER_FILTER[dimension]: row.id}),
            latency=latency.get(str(row.id)) if dimension == "model" else None,
        )
        for row in spenders
    ]
    return Table(dimension=dimension, title=_TITLES[dimension], columns=_columns(query, f"o_{dimension}", sort), rows=rows)


def console_view(request: HttpRequest, *, admin_site: AdminSite) -> TemplateResponse:
    """The console: spend per period and per day, top users, keys and models, latency, budgets, endpoints."""
    if not console_permitted(request, admin_site):
        raise PermissionDenied
    query = ConsoleQuery(request.GET)
    valid = query.is_valid()
    at: datetime = now()
    days = selectors.console_days(at=at, days=query.setting("days", DEFAULT_DAYS))
    top = query.setting("top", TOP_CHOICES[0])
    sorts: dict[Dimension, str] = {dimension: query.setting(f"o_{dimension}", DEFAULT_SORT) for dimension in _TITLES}
    since, until = selectors.latency_window(at=at, hours=LATENCY_HOURS)
    latency = selectors.ttft_by_model(since=since, until=until)
    totals = selectors.range_totals(days=days)
    spenders: dict[Dimension, list[SpendRow]] = {
        "user": selectors.top_spenders(by="user", days=days, sort=sorts["user"], limit=top),
        "key": selectors.top_spenders(by="key", days=days, sort=sorts["key"], limit=top),
        "model": selectors.top_models(totals, sort=sorts["model"], limit=top),
    }
    ledger = reverse("admin:billing_usagerecord_changelist")
    tables = {
        dimension: _table(
            dimension, rows, query=request.GET, sort=sorts[dimension], days=days, latency=latency, ledger=ledger,
        )
        for dimension, rows in spenders.items()
    }
    budgets = selectors.account_budgets(at=at)
    endpoints = [
        EndpointRow(spend=spend, ledger_url=ledger_url(period=days, ledger=ledger, endpoint__exact=spend.endpoint))
        for spend in totals.by_endpoint
    ]

    def day_ledger(day: date) -> str:
        return ledger_url(period=Period("day", day, day + timedelta(days=1), days.zone), ledger=ledger)

    context = {
        **admin_site.each_context(request),
        "title": "Cost console",
        "at": at,
        "billing_time_zone": billing_zone().key,
        "errors": query.errors,
        "periods": selectors.spend_by_period(at=at),
        "days": days,
        "day_choices": [(n, _with(request.GET, days=n), n == days.days) for n in DAY_CHOICES],
        "top_choices": [(n, _with(request.GET, top=n), n == top) for n in TOP_CHOICES],
        "chart": spend_chart_svg(totals.by_day, link=day_ledger),
        "totals": totals,
        "range_ledger_url": ledger_url(period=days, ledger=ledger),
        "users": tables["user"],
        "keys": tables["key"],
        "models": tables["model"],
        "endpoints": endpoints,
        "latency": latency,
        "latency_hours": LATENCY_HOURS,
        "budgets": budgets[:BUDGET_ROWS],
        "budgets_hidden": max(len(budgets) - BUDGET_ROWS, 0),
        "budgets_past_threshold": sum(1 for board in budgets if board.past_threshold),
        "accounts_url": reverse("admin:billing_account_changelist"),
    }
    return TemplateResponse(request, CONSOLE_TEMPLATE, context, status=200 if valid else 400)
