"""The cost console's lists: staff edit prices, plans and accounts; the ledger, rollups and holds are read-only.

Money reads as money (`billing.display`): `$1,234.56` in lists, every stored digit on a detail
page. Each list runs a bounded number of queries whatever its length: related rows are joined
(`list_select_related`), per-row figures are subqueries of the list's one query, and the ledger's
and rollups' totals come from the same aggregate query that counts the filtered rows
(`TotalsPaginator`). Filters that could list a million values take typed input instead
(`billing.admin_filters`).

The ledger list stays fast on millions of rows (`bench/admin_pages.py` measures it): filtered by
what the rollups record (days, user, model, endpoint, key), its count and totals are the rollups'
sums (`ledger_rollup`); a page's rows are found by their ids first (`LedgerPaginator.page`); it
sorts only by indexed columns (time, cost); its search is an exact request id, through its unique
index, or an exact upstream id (`chatcmpl-...`, `resp_...`), through its partial index.

Staff without the superuser flag get view-only access through the "Cost viewers" group
(`llmgateway.staff`): every list and detail page, and the export, but no action that writes.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import date
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import urlencode

from django.contrib import admin
from django.contrib.admin.views.main import ALL_VAR, ORDER_VAR, PAGE_VAR, ChangeList
from django.core.exceptions import PermissionDenied
from django.core.paginator import Page, Paginator
from django.db.models import Aggregate, Count, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from billing import display
from billing.admin_filters import (
    AccountUserFilter,
    ApiKeyFilter,
    LedgerDateFilter,
    ModelFilter,
    RollupDateFilter,
    UserFilter,
)
from billing.exports import FORMATS, GROUPS, ExportError, ExportSpec
from billing.fields import ExactDecimalField
from billing.models import (
    TOTAL_DIGITS,
    Account,
    AccountPrice,
    DailyKeyUsage,
    DailyUsage,
    PlanPrice,
    Price,
    PricingPlan,
    Reservation,
    UsageRecord,
)
from billing.money import money_sum
from billing.periods import billing_zone, period_containing
from billing.selectors import UsageTotals, period_usage
from billing.views import export_spec_from_query, usage_export_response

RATE_FIELDS = ("input_usd_per_1m", "cached_input_usd_per_1m", "output_usd_per_1m")
RATE_HELP = {
    "input_usd_per_1m": "USD per 1M prompt tokens that were not cached.",
    "cached_input_usd_per_1m": "USD per 1M cached prompt tokens. Empty: the input rate.",
    "output_usd_per_1m": "USD per 1M completion tokens (reasoning tokens included).",
}
# Sums read back as the column is stored (billing.fields): exact on SQLite too.
MONEY = ExactDecimalField(**TOTAL_DIGITS)


def money_total(expression: Any) -> Coalesce:
    return Coalesce(Sum(expression), Value(0), output_field=MONEY)


def _rate(value: Decimal | None) -> str:
    return display.NO_VALUE if value is None else display.usd_exact(value)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Viewable by staff with the view permission; written only by the gateway."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# --- Totals of the filtered rows --------------------------------------------------------------


class TotalsPaginator(Paginator):
    """Count the filtered rows and add them up in one aggregate query.

    The changelist needs the count anyway (on a big ledger, a scan of the filtered rows); the
    totals shown above the list come from the same statement, so they cost no second scan.
    """

    sums: ClassVar[dict[str, Aggregate | Coalesce]]

    @cached_property
    def totals(self) -> dict[str, Any]:
        return self.object_list.aggregate(rows=Count("pk"), **self.sums)  # type: ignore[attr-defined]

    @cached_property
    def count(self) -> int:
        return int(self.totals["rows"])


class LedgerPaginator(TotalsPaginator):
    """The ledger's paginator: totals from the rollups when they answer, pages found by their ids.

    `rollup`: rollup rows whose sums are those of the filtered ledger rows (`ledger_rollup`), or
    None: then the filtered ledger is counted and summed (bounded by the filter's index).
    """

    sums: ClassVar[dict[str, Aggregate | Coalesce]] = {
        "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
        "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
        "cached_tokens": Coalesce(Sum("cached_tokens"), 0),
        "cost_usd": money_total("cost_usd"),
    }

    def __init__(self, *args: Any, rollup: QuerySet[DailyUsage] | QuerySet[DailyKeyUsage] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rollup = rollup

    @cached_property
    def totals(self) -> dict[str, Any]:
        if self.rollup is None:
            return super().totals
        # One row per call in the rollups' `requests`: the count of the ledger rows they sum.
        return self.rollup.aggregate(rows=Coalesce(Sum("requests"), 0), **self.sums)

    def page(self, number: int | str) -> Page:
        """The page's rows by their ids first: `pk IN (SELECT pk ... ORDER BY ... OFFSET n LIMIT m)`.

        The inner query reads only ids in the list's order, so the database skips the rows before
        the page in an index (`usage_created_id`, `usage_cost_id`: index-only) instead of reading
        each of them whole; page 10,000 of a million rows took 0.9 s, now 40 ms. The outer query
        reads the page's rows and sorts them again. What is counted, and the orphans, are Django's.
        """
        number = self.validate_number(number)
        bottom = (number - 1) * self.per_page
        top = bottom + self.per_page
        if top + self.orphans >= self.count:
            top = self.count
        ids = self.object_list.values("pk")[bottom:top]  # type: ignore[attr-defined]
        return self._get_page(self.object_list.filter(pk__in=ids), number, self)  # type: ignore[attr-defined]


# The ledger list's parameters that choose rows the rollups also add up, and the rollup field each
# is: `billing.admin_filters`' date range (billing days), user, model, endpoint and key prefix,
# and the lookups of the console's links (a user, key or model by id or name). Any other (status,
# search, an instant) is answered by the ledger itself.
USER_FILTERS = {"user": "username", "user__id__exact": "id"}
MODEL_FILTERS = ("model", "model__exact")
ENDPOINT_FILTER = "endpoint__exact"
KEY_FILTERS = {"key": "prefix__startswith", "api_key__id__exact": "id"}
ROLLUP_FILTERS = frozenset({"since", "until", *USER_FILTERS, *MODEL_FILTERS, ENDPOINT_FILTER, *KEY_FILTERS})
PAGE_PARAMETERS = frozenset({PAGE_VAR, ORDER_VAR, ALL_VAR})


def ledger_rollup(params: Mapping[str, str]) -> QuerySet[DailyUsage] | QuerySet[DailyKeyUsage] | None:
    """Rollup rows whose sums equal the ledger rows the list's `params` select, or None.

    The rollups are kept in each ledger row's transaction, by local day in BILLING_TIME_ZONE
    (`billing.services`), so for a filter made of billing days, a user, a model, an endpoint or a
    key their sums are the ledger's, exactly, from thousands of rows instead of a million. A key
    reads the key rollups (without a model or an endpoint: they have neither). Blank values are no
    filter, as in the filters themselves; the last value of a repeated parameter counts, as there.
    """
    given = {name: value.strip() for name, value in params.items() if name not in PAGE_PARAMETERS and value.strip()}
    if not given.keys() <= ROLLUP_FILTERS:
        return None
    try:
        days = Q()
        if "since" in given:
            days &= Q(day__gte=date.fromisoformat(given["since"]))
        if "until" in given:
            days &= Q(day__lt=date.fromisoformat(given["until"]))
        for name in ("user__id__exact", "api_key__id__exact"):
            if name in given:
                int(given[name])
    except ValueError:
        return None  # the list refuses it
    users = {f"user__{field}": given[name] for name, field in USER_FILTERS.items() if name in given}
    models = {given[name] for name in MODEL_FILTERS if name in given}
    keys = {f"api_key__{field}": given[name] for name, field in KEY_FILTERS.items() if name in given}
    endpoint = {"endpoint": given[ENDPOINT_FILTER]} if ENDPOINT_FILTER in given else {}
    if keys:
        if models or endpoint:
            return None
        return DailyKeyUsage.objects.filter(days, **keys, **{f"api_key__{name}": value for name, value in users.items()})
    if len(models) > 1:
        return DailyUsage.objects.none()  # two models: no call is of both
    return DailyUsage.objects.filter(days, **users, **endpoint, **({"model": models.pop()} if models else {}))


class RollupPaginator(TotalsPaginator):
    sums: ClassVar[dict[str, Aggregate | Coalesce]] = {**LedgerPaginator.sums, "requests": Coalesce(Sum("requests"), 0)}


class TotalsAdmin(ReadOnlyAdmin):
    """A read-only list with the totals of its filtered rows above it (`totals` in the context)."""

    paginator = TotalsPaginator
    show_facets = admin.ShowFacets.NEVER  # a count per choice would scan the table once per choice

    # Which of the paginator's totals counts the calls: its rows (one per call in the ledger), or
    # the rollups' `requests`.
    requests_total: ClassVar[str] = "rows"

    def usage_totals(self, totals: dict[str, Any]) -> UsageTotals:
        return UsageTotals(
            requests=int(totals[self.requests_total]),
            prompt_tokens=int(totals["prompt_tokens"]),
            completion_tokens=int(totals["completion_tokens"]),
            cached_tokens=int(totals["cached_tokens"]),
            cost_usd=Decimal(totals["cost_usd"]),
        )

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None)
        changelist = context.get("cl") if context else None
        if context is not None and changelist is not None:
            totals = self.usage_totals(changelist.paginator.totals)
            context["totals"] = totals
            context["totals_display"] = [
                ("requests", display.count(totals.requests)),
                ("tokens in", display.count(totals.prompt_tokens)),
                ("of which cached", display.count(totals.cached_tokens)),
                ("tokens out", display.count(totals.completion_tokens)),
                ("cost", display.usd_brief(totals.cost_usd)),
            ]
            context["totals_exact_cost"] = display.usd_exact(totals.cost_usd)
        return response


# --- Prices and plans -------------------------------------------------------------------------


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    """Catalog prices. One already in effect is history: change a price by adding a later row."""

    list_display = ("model", "input_rate", "cached_rate", "output_rate", "effective_from", "in_effect_now", "note")
    list_filter = ("model",)
    search_fields = ("model", "note")
    date_hierarchy = "effective_from"
    readonly_fields = ("created_at",)
    actions = None  # "delete selected" would bypass the per-row delete guard below
    list_per_page = 100

    @admin.display(description="input / 1M", ordering="input_usd_per_1m")
    def input_rate(self, obj: Price) -> str:
        return _rate(obj.input_usd_per_1m)

    @admin.display(description="cached / 1M", ordering="cached_input_usd_per_1m")
    def cached_rate(self, obj: Price) -> str:
        return _rate(obj.cached_input_usd_per_1m)

    @admin.display(description="output / 1M", ordering="output_usd_per_1m")
    def output_rate(self, obj: Price) -> str:
        return _rate(obj.output_usd_per_1m)

    @admin.display(boolean=True, description="in effect")
    def in_effect_now(self, obj: Price) -> bool:
        return obj.in_effect()

    def get_readonly_fields(self, request: HttpRequest, obj: Price | None = None) -> tuple[str, ...]:
        if obj is not None and obj.in_effect():
            return ("model", *RATE_FIELDS, "effective_from", "created_at")
        return ("created_at",)

    def has_delete_permission(self, request: HttpRequest, obj: Price | None = None) -> bool:
        if obj is not None and obj.in_effect():
            return False
        return super().has_delete_permission(request, obj)


class PlanPriceInline(admin.TabularInline):
    model = PlanPrice
    extra = 0
    fields = ("model", *RATE_FIELDS)
    verbose_name = "price override"
    verbose_name_plural = "price overrides: final prices for this plan's accounts (the multiplier does not apply)"

    def get_formset(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> Any:
        return super().get_formset(request, obj, help_texts=RATE_HELP, **kwargs)


@admin.register(PricingPlan)
class PricingPlanAdmin(admin.ModelAdmin):
    """Plans price their accounts; an account without a plan pays catalog prices."""

    list_display = ("name", "markup", "override_count", "account_count", "description")
    search_fields = ("name",)
    inlines = [PlanPriceInline]
    fieldsets = (
        (
            None,
            {
                "fields": ("name", "multiplier", "description"),
                "description": (
                    "A plan sets what its accounts pay. A model's price is, most specific first: the "
                    "account's own override, else this plan's override (below), else the catalog price "
                    "times this plan's multiplier. Overrides are final prices: the multiplier does not "
                    "scale them. Accounts without a plan pay catalog prices."
                ),
            },
        ),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[PricingPlan]:
        return super().get_queryset(request).annotate(
            _overrides=Count("prices", distinct=True), _accounts=Count("accounts", distinct=True)
        )

    @admin.display(description="multiplier", ordering="multiplier")
    def markup(self, obj: PricingPlan) -> str:
        change = (obj.multiplier - 1) * 100
        sign = "+" if change > 0 else ""
        return f"×{obj.multiplier.normalize():f} ({sign}{change.normalize():f}%)"

    @admin.display(description="model overrides", ordering="_overrides")
    def override_count(self, obj: PricingPlan) -> int:
        return obj._overrides  # type: ignore[attr-defined]

    @admin.display(description="accounts", ordering="_accounts")
    def account_count(self, obj: PricingPlan) -> int:
        return obj._accounts  # type: ignore[attr-defined]


# --- Accounts ---------------------------------------------------------------------------------


class AccountPriceInline(admin.TabularInline):
    model = AccountPrice
    extra = 0
    fields = ("model", *RATE_FIELDS)
    verbose_name = "price override"
    verbose_name_plural = "price overrides: final prices for this account, before its plan's"

    def get_formset(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> Any:
        return super().get_formset(request, obj, help_texts=RATE_HELP, **kwargs)


class SuspendedFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "suspended"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("no", "active"), ("yes", "suspended")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() in ("yes", "no"):
            return queryset.filter(user__is_active=self.value() == "no")
        return queryset


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    """Accounts with this month's spend, live holds, what is left and the share used.

    "Used" is spend plus holds, against the monthly spend limit: what the next admission checks.
    The edge adds the suspend actions (`llmgateway.admin`): they stop calls, which billing cannot.
    """

    list_display = ("user", "status", "plan", "spent", "held", "left", "used", "monthly_limit")
    list_filter = (SuspendedFilter, "plan")
    list_select_related = ("user", "plan")
    list_per_page = 100
    search_fields = ("user__username", "user__email")
    raw_id_fields = ("user",)
    readonly_fields = ("budgets_now", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("user", "plan")}),
        ("Now", {"fields": ("budgets_now",)}),
        (
            "Budgets",
            {
                "fields": ("monthly_spend_limit_usd", "daily_spend_limit_usd", "monthly_token_limit", "daily_token_limit", "soft_threshold"),
                "description": (
                    "Empty means no limit. Periods are calendar days and months in BILLING_TIME_ZONE. "
                    "Before each call the gateway holds its worst-case cost; a call is refused if spend "
                    "plus holds plus that would pass a limit."
                ),
            },
        ),
        (None, {"fields": ("created_at", "updated_at")}),
    )
    inlines = [AccountPriceInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Account]:
        now = timezone.now()
        month = period_containing("month", now)
        spend = (
            DailyUsage.objects.filter(user_id=OuterRef("user_id"), day__gte=month.first_day, day__lt=month.end_day)
            .order_by()
            .values("user_id")
            .annotate(total=Sum("cost_usd"))
            .values("total")
        )
        held = (
            Reservation.objects.filter(account_id=OuterRef("pk"), expires_at__gt=now)
            .order_by()
            .values("account_id")
            .annotate(total=Sum("cost_usd"))
            .values("total")
        )
        return (
            super()
            .get_queryset(request)
            .annotate(
                _month_spend=Coalesce(Subquery(spend), Value(0), output_field=MONEY),
                _held=Coalesce(Subquery(held), Value(0), output_field=MONEY),
            )
        )

    @admin.display(description="status", ordering="user__is_active")
    def status(self, obj: Account) -> SafeString:
        kind, label = ("ok", "active") if obj.user.is_active else ("bad", "suspended")
        return format_html('<span class="badge {}">{}</span>', kind, label)

    @admin.display(description="spent this month", ordering="_month_spend")
    def spent(self, obj: Account) -> str:
        return display.usd_brief(obj._month_spend)  # type: ignore[attr-defined]

    @admin.display(description="held", ordering="_held")
    def held(self, obj: Account) -> str:
        return display.usd_brief(obj._held)  # type: ignore[attr-defined]

    def _used(self, obj: Account) -> Decimal:
        return money_sum([obj._month_spend, obj._held])  # type: ignore[attr-defined]

    @admin.display(description="left")
    def left(self, obj: Account) -> str:
        limit = obj.monthly_spend_limit_usd
        if limit is None:
            return "no limit"
        return display.usd_brief(max(money_sum([limit, -self._used(obj)]), Decimal(0)))

    @admin.display(description="used")
    def used(self, obj: Account) -> SafeString | str:
        limit = obj.monthly_spend_limit_usd
        if limit is None:
            return display.NO_VALUE
        used = self._used(obj)
        share = display.percent_of(used, limit)
        fraction = min(used / limit, Decimal(1)) if limit > 0 else Decimal(1)
        return format_html(
            '<meter min="0" max="1" low="{}" high="0.999" optimum="0" value="{}" title="{} of {}"></meter> {}',
            obj.soft_threshold, fraction, display.usd_brief(used), display.usd_brief(limit), share,
        )

    @admin.display(description="monthly limit", ordering="monthly_spend_limit_usd")
    def monthly_limit(self, obj: Account) -> str:
        limit = obj.monthly_spend_limit_usd
        return "no limit" if limit is None else display.usd_brief(limit)

    @admin.display(description="this period")
    def budgets_now(self, obj: Account) -> SafeString | str:
        """Each limit as the next admission sees it: settled usage, live holds, what is left."""
        if obj.pk is None:
            return display.NO_VALUE
        usage = period_usage(account=obj, at=timezone.now())
        rows: list[tuple[str, str, str, str, str, str]] = []
        for label, spend_limit, settled in (
            ("spend today", obj.daily_spend_limit_usd, usage.day_cost_usd),
            ("spend this month", obj.monthly_spend_limit_usd, usage.month_cost_usd),
        ):
            used = money_sum([settled, usage.reserved_usd])
            if spend_limit is None:
                limit_cells = ("no limit", display.NO_VALUE, display.NO_VALUE)
            else:
                left = max(money_sum([spend_limit, -used]), Decimal(0))
                limit_cells = (display.usd_exact(left), display.usd_exact(spend_limit), display.percent_of(used, spend_limit))
            rows.append((label, display.usd_exact(settled), display.usd_exact(usage.reserved_usd), *limit_cells))
        for label, token_limit, tokens in (
            ("tokens today", obj.daily_token_limit, usage.day_tokens),
            ("tokens this month", obj.monthly_token_limit, usage.month_tokens),
        ):
            used_tokens = tokens + usage.reserved_tokens
            if token_limit is None:
                limit_cells = ("no limit", display.NO_VALUE, display.NO_VALUE)
            else:
                limit_cells = (
                    display.count(max(token_limit - used_tokens, 0)),
                    display.count(token_limit),
                    display.percent_of(used_tokens, token_limit),
                )
            rows.append((label, display.count(tokens), display.count(usage.reserved_tokens), *limit_cells))
        header = mark_safe(  # noqa: S308  # a constant
            "<tr><th></th><th>settled</th><th>held (calls in flight)</th><th>left</th><th>limit</th><th>used</th></tr>"
        )
        body = format_html_join("", "<tr><th>{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", rows)
        return format_html('<table class="budgets-now">{}{}</table>', header, body)


# --- The ledger and its rollups ---------------------------------------------------------------


STATUS_BADGES: dict[str, str] = {
    UsageRecord.Status.COMPLETED: "ok",
    UsageRecord.Status.CANCELLED: "warn",
    UsageRecord.Status.REJECTED: "warn",
}
# Short enough for a list column; the full label is the badge's tooltip and on the detail page.
STATUS_SHORT: dict[str, str] = {
    UsageRecord.Status.CANCELLED: "cancelled",
    UsageRecord.Status.UPSTREAM_ERROR: "upstream error",
}
# The same for endpoints: the API's last word; the path (`/v1/chat/completions`) is the tooltip.
ENDPOINT_SHORT: dict[str, str] = {
    UsageRecord.Endpoint.CHAT_COMPLETIONS: "chat",
    UsageRecord.Endpoint.RESPONSES: "responses",
    UsageRecord.Endpoint.COMPLETIONS: "completions",
    UsageRecord.Endpoint.EMBEDDINGS: "embeddings",
}


def endpoint_cell(endpoint: str) -> SafeString:
    """An endpoint in a list column: its short name, with its path as the tooltip."""
    path = UsageRecord.Endpoint(endpoint).label if endpoint in UsageRecord.Endpoint.values else endpoint
    return format_html('<span title="{}">{}</span>', path, ENDPOINT_SHORT.get(endpoint, endpoint))


class RequestIdSearch(admin.ModelAdmin):
    """A search box for one request id, answered by the unique index on `request_id`.

    Django's `=request_id` search compares text (`UPPER(request_id::text)` on PostgreSQL): a scan
    of the whole ledger, 0.7 s on a million rows. A term that is no UUID matches nothing, unless
    `matches_upstream_ids`: then it is an upstream's id for its answer, matched exactly (case
    and all) through the partial index `usage_upstream_id`. With `matches_calls`, a request id also
    finds every attempt of that call (the indexed `call_id`).
    """

    search_fields = ("request_id",)
    search_help_text = "A request id (the x-request-id response header)."
    matches_calls = False
    matches_upstream_ids = False

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[Any], search_term: str) -> tuple[QuerySet[Any], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            request_id = uuid.UUID(term)
        except ValueError:
            if self.matches_upstream_ids:
                return queryset.filter(upstream_id=term), False
            return queryset.none(), False
        if self.matches_calls:
            return queryset.filter(Q(request_id=request_id) | Q(call_id=request_id)), False
        return queryset.filter(request_id=request_id), False


class SortableByChangeList(ChangeList):
    """Django's ChangeList, sorting only by the columns `sortable_by` names. Django leaves out the
    links for the others but still honours a sort typed into the URL (`?o=2`), which on a
    million-row ledger reads every row; here it is ignored, as the page offers no such sort."""

    def get_ordering(self, request: HttpRequest, queryset: QuerySet[Any]) -> list[Any]:
        asked = self.params.get(ORDER_VAR)
        if asked is not None:
            kept = [part for part in str(asked).split(".") if self._sortable(part)]
            if kept:
                self.params[ORDER_VAR] = ".".join(kept)
            else:
                del self.params[ORDER_VAR]  # the list's own order, as if none was asked
        return super().get_ordering(request, queryset)

    def _sortable(self, part: str) -> bool:
        try:
            field_name = self.list_display[int(part.rpartition("-")[2])]
        except (IndexError, ValueError):
            return False
        return self.sortable_by is None or field_name in self.sortable_by


@admin.register(UsageRecord)
class UsageRecordAdmin(RequestIdSearch, TotalsAdmin):
    """The ledger: one row per call. Read-only; a correction is a new row, never an edit."""

    paginator = LedgerPaginator
    # Fits 1,280 px beside the admin's two sidebars; the duration and rates are on the row's page.
    list_display = ("when", "user", "key", "model", "api", "status_badge", "tokens", "ttft", "cost")
    list_display_links = ("when",)
    matches_calls = True
    matches_upstream_ids = True
    search_help_text = (
        "A request id (the x-request-id response header): the call and every attempt it made; "
        "or the upstream's id of its answer (chatcmpl-…, resp_…), exactly."
    )
    list_filter = (
        LedgerDateFilter, UserFilter, ApiKeyFilter, ModelFilter, "endpoint", "status", "price_source", "token_source",
    )
    list_select_related = ("user", "api_key")
    list_per_page = 50
    list_max_show_all = 500
    show_full_result_count = False
    # Columns an index sorts (`usage_created_id`, `usage_cost_id`): any other sort of a million
    # rows reads them all. Filters narrow by user, key, model and status.
    sortable_by = ("when", "cost")
    actions = ["export_csv"]
    fieldsets = (
        (
            "Call",
            {
                "fields": (
                    "user", "key_detail", "model", "requested_model", "endpoint", "route", "upstream_id", "stream",
                    "status", "error_kind", "request_id", "attempt_detail", "started",
                )
            },
        ),
        ("Tokens", {"fields": ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "token_source")}),
        ("Timing", {"fields": ("ttft_detail", "duration")}),
        (
            "Cost",
            {
                "fields": ("cost_exact", "rates", "price_source", "held_at_admission"),
                "description": "Exact, as stored (to 1e-10 USD), with the rates this call was billed at.",
            },
        ),
    )
    readonly_fields = (
        "key_detail", "route", "attempt_detail", "started", "ttft_detail", "duration", "cost_exact", "rates", "held_at_admission",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[UsageRecord]:
        return super().get_queryset(request).select_related("user", "api_key")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return SortableByChangeList

    def get_paginator(
        self, request: HttpRequest, queryset: QuerySet[UsageRecord], per_page: int, orphans: int = 0, allow_empty_first_page: bool = True
    ) -> LedgerPaginator:
        return LedgerPaginator(queryset, per_page, orphans, allow_empty_first_page, rollup=ledger_rollup(request.GET))

    @admin.display(description="time", ordering="created_at")
    def when(self, obj: UsageRecord) -> SafeString:
        return format_html('<span title="{}">{}</span>', display.when_exact(obj.created_at), display.when_brief(obj.created_at))

    @admin.display(description="key", ordering="api_key__prefix")
    def key(self, obj: UsageRecord) -> str:
        return obj.api_key.prefix if obj.api_key is not None else display.NO_VALUE

    @admin.display(description="API")
    def api(self, obj: UsageRecord) -> SafeString:
        return endpoint_cell(obj.endpoint)

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: UsageRecord) -> SafeString:
        label = STATUS_SHORT.get(obj.status, obj.status)
        return format_html('<span class="badge {}" title="{}">{}</span>', STATUS_BADGES.get(obj.status, "bad"), obj.get_status_display(), label)

    @admin.display(description="tokens in → out")
    def tokens(self, obj: UsageRecord) -> str:
        return f"{display.count(obj.prompt_tokens)} → {display.count(obj.completion_tokens)}"

    @admin.display(description="TTFT", ordering="ttft_us")
    def ttft(self, obj: UsageRecord) -> str:
        return display.duration_us(obj.ttft_us)

    @admin.display(description="duration", ordering="duration_us")
    def duration(self, obj: UsageRecord) -> str:
        return display.duration_us(obj.duration_us)

    @admin.display(description="cost", ordering="cost_usd")
    def cost(self, obj: UsageRecord) -> str:
        return display.usd_brief(obj.cost_usd)

    @admin.display(description="cost (exact)")
    def cost_exact(self, obj: UsageRecord) -> str:
        return display.usd_exact(obj.cost_usd)

    @admin.display(description="started")
    def started(self, obj: UsageRecord) -> str:
        return display.when_exact(obj.created_at)

    @admin.display(description="API key")
    def key_detail(self, obj: UsageRecord) -> str:
        return str(obj.api_key) if obj.api_key is not None else "none (the chat page, or a deleted key)"

    @admin.display(description="upstream")
    def route(self, obj: UsageRecord) -> str:
        return f"{obj.upstream_model} via {obj.provider}"

    @admin.display(description="attempt")
    def attempt_detail(self, obj: UsageRecord) -> SafeString | str:
        if obj.call_id is None:
            return "1 (the only one)"
        attempts = UsageRecord.objects.filter(call_id=obj.call_id).count()
        if attempts == 1:
            return "1 (the only one)"
        url = reverse("admin:billing_usagerecord_changelist") + "?" + urlencode({"q": str(obj.call_id)})
        return format_html('{} of <a href="{}">{} attempts of call {}</a>', obj.attempt, url, attempts, obj.call_id)

    @admin.display(description="rates (USD per 1M tokens)")
    def rates(self, obj: UsageRecord) -> str:
        return (
            f"{_rate(obj.input_usd_per_1m)} input · {_rate(obj.cached_input_usd_per_1m)} cached · "
            f"{_rate(obj.output_usd_per_1m)} output · plan multiplier ×{obj.price_multiplier.normalize():f}"
        )

    @admin.display(description="time to first token")
    def ttft_detail(self, obj: UsageRecord) -> str:
        return display.duration_us(obj.ttft_us)

    @admin.display(description="held at admission")
    def held_at_admission(self, obj: UsageRecord) -> str:
        if obj.reserved_usd is None:
            return "nothing (the account has no limits)"
        return display.usd_exact(obj.reserved_usd)

    @admin.action(description="Export selected usage records as CSV", permissions=["view"])
    def export_csv(self, request: HttpRequest, queryset: QuerySet[UsageRecord]) -> HttpResponseBase:
        """The selected ledger rows, streamed by the exporter `manage.py export_costs` uses."""
        return usage_export_response(request, ExportSpec(), records=queryset)

    def get_urls(self) -> list[URLPattern]:
        export = path(
            "export/",
            self.admin_site.admin_view(self.export_view),
            name=f"{self.opts.app_label}_{self.opts.model_name}_export",
        )
        return [export, *super().get_urls()]

    def export_view(self, request: HttpRequest) -> HttpResponseBase:
        """Without a query, a form; with one, the export it describes, streamed (`billing.views`).

        Staff only (`admin_view` redirects others to the login), with view permission on usage
        records. A bad parameter shows the form again with the error, status 400.
        """
        if not self.has_view_permission(request):
            raise PermissionDenied
        error = ""
        if request.GET:
            try:
                spec = export_spec_from_query(request.GET)
            except ExportError as exc:
                error = str(exc)
            else:
                return usage_export_response(request, spec)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Export costs",
            "error": error,
            "query": request.GET,
            "groups": GROUPS,
            "formats": FORMATS,
            "chosen_groups": request.GET.getlist("group_by"),
            "billing_time_zone": billing_zone().key,
        }
        return TemplateResponse(request, "admin/billing/usagerecord/export.html", context, status=400 if error else 200)


@admin.register(DailyUsage)
class DailyUsageAdmin(TotalsAdmin):
    """The ledger summed per user, model, endpoint and calendar day (BILLING_TIME_ZONE); equal to the ledger's sums."""

    paginator = RollupPaginator
    requests_total = "requests"
    list_display = ("day", "user", "model", "api", "request_count", "tokens_in", "tokens_out", "cost")
    list_filter = (RollupDateFilter, UserFilter, ModelFilter, "endpoint")
    list_select_related = ("user",)
    list_per_page = 100
    list_max_show_all = 500
    show_full_result_count = False  # a second count of a table that grows by users x models a day
    search_fields = ()
    readonly_fields = ("cost_exact",)
    fields = ("day", "user", "model", "endpoint", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_exact")

    def get_queryset(self, request: HttpRequest) -> QuerySet[DailyUsage]:
        return super().get_queryset(request).select_related("user")

    @admin.display(description="API", ordering="endpoint")
    def api(self, obj: DailyUsage) -> SafeString:
        return endpoint_cell(obj.endpoint)

    @admin.display(description="requests", ordering="requests")
    def request_count(self, obj: DailyUsage) -> str:
        return display.count(obj.requests)

    @admin.display(description="tokens in", ordering="prompt_tokens")
    def tokens_in(self, obj: DailyUsage) -> str:
        return display.count(obj.prompt_tokens)

    @admin.display(description="tokens out", ordering="completion_tokens")
    def tokens_out(self, obj: DailyUsage) -> str:
        return display.count(obj.completion_tokens)

    @admin.display(description="cost", ordering="cost_usd")
    def cost(self, obj: DailyUsage) -> str:
        return display.usd_brief(obj.cost_usd)

    @admin.display(description="cost (exact)")
    def cost_exact(self, obj: DailyUsage) -> str:
        return display.usd_exact(obj.cost_usd)


@admin.register(Reservation)
class ReservationAdmin(RequestIdSearch, ReadOnlyAdmin):
    """Holds: budget taken by calls in flight. Deleting one frees its budget early (it expires anyway)."""

    list_display = ("when", "user", "model", "worst_case", "token_count", "expires")
    list_display_links = ("when",)
    list_filter = (AccountUserFilter, ModelFilter)
    list_select_related = ("account__user",)
    list_per_page = 100
    fields = ("request_id", "user", "model", "worst_case_exact", "tokens", "created_at", "expires_at")
    readonly_fields = ("user", "worst_case_exact")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Reservation]:
        return super().get_queryset(request).select_related("account__user")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return admin.ModelAdmin.has_delete_permission(self, request, obj)

    @admin.display(description="taken", ordering="created_at")
    def when(self, obj: Reservation) -> str:
        return display.when(obj.created_at)

    @admin.display(description="user", ordering="account__user__username")
    def user(self, obj: Reservation) -> str:
        return str(obj.account.user)

    @admin.display(description="worst-case cost", ordering="cost_usd")
    def worst_case(self, obj: Reservation) -> str:
        return display.usd_brief(obj.cost_usd)

    @admin.display(description="worst-case cost (exact)")
    def worst_case_exact(self, obj: Reservation) -> str:
        return display.usd_exact(obj.cost_usd)

    @admin.display(description="tokens", ordering="tokens")
    def token_count(self, obj: Reservation) -> str:
        return display.count(obj.tokens)

    @admin.display(description="expires", ordering="expires_at")
    def expires(self, obj: Reservation) -> SafeString:
        if obj.expires_at <= timezone.now():
            return format_html('<span class="badge bad">expired {}</span>', display.when(obj.expires_at))
        return format_html('<span class="badge ok">live</span> until {}', display.when(obj.expires_at))

